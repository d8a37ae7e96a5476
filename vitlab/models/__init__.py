"""vitlab's model families, registered into timm's registry under `vl_` names on import."""
from . import vit_fmnist  # noqa: F401  (registers vl_vit_fmnist, vl_test_vit)
