"""End-to-end fixtures: the integration ones (upstream servers, test CA) and a whole
``proxyfleet up`` system per test module."""

from collections.abc import Iterator

import pytest

from services.proxy.tls import CertificateAuthority
from tests.e2e.system import System, running_system
from tests.integration.conftest import upstream

__all__ = ["upstream"]


@pytest.fixture(scope="module")
def upstream_ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path_factory.mktemp("upstream-ca"))


@pytest.fixture(scope="module")
def system(
    tmp_path_factory: pytest.TempPathFactory, upstream_ca: CertificateAuthority
) -> Iterator[System]:
    with running_system(tmp_path_factory.mktemp("up"), upstream_ca.cert_path) as running:
        yield running
