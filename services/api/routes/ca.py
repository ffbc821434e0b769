"""``/api/ca.pem``: the proxies' CA certificate, for clients to trust interception.

The replicas publish it in KV ``fleet_config``/``ca_cert``; the API only serves
it, so onboarding a client never needs access to a proxy's data directory.
"""

from __future__ import annotations

from fastapi import APIRouter, Response

from services.api.deps import ConfigDep
from services.api.errors import ApiError, problem_responses

router = APIRouter(tags=["ca"])

PEM_MEDIA_TYPE = "application/x-pem-file"


@router.get(
    "/ca.pem",
    summary="The CA certificate the proxies sign intercepted connections with",
    response_class=Response,
    responses={
        200: {
            "description": "PEM-encoded X.509 certificate",
            "content": {PEM_MEDIA_TYPE: {"schema": {"type": "string"}}},
        },
        **problem_responses(
            401, 403, 404, 503, _404="No proxy has published its CA yet (CA_NOT_AVAILABLE)"
        ),
    },
)
async def ca_certificate(config: ConfigDep) -> Response:
    pem = await config.ca_certificate()
    if pem is None:
        raise ApiError(
            404, "CA_NOT_AVAILABLE", "no proxy replica has published its CA certificate yet"
        )
    return Response(
        pem,
        media_type=PEM_MEDIA_TYPE,
        headers={"Content-Disposition": 'attachment; filename="proxyfleet-ca.pem"'},
    )
