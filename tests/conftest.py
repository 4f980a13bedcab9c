import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smoke_models(tmp_path_factory):
    """A smoke VAE (runs/vae) and a smoke SiT on it (runs/sit), trained once for every test that only reads them."""
    import train_diffusion
    import train_vae
    root = tmp_path_factory.mktemp("models")
    train_vae.main(["--preset", "smoke", "--out", str(root / "vae"), "--gan-weight", "0"])
    train_diffusion.main(["--preset", "smoke", "--vae", str(root / "vae" / "last.pt"), "--out", str(root / "sit")])
    return root
