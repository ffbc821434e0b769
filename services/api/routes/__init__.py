"""One ``APIRouter`` per resource; ``services.api.app`` mounts them under ``/api``."""
