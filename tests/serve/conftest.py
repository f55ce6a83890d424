"""Server fixtures: the real app (builtin://tiny, two PEFT adapters) on a free 127.0.0.1 port,
driven over HTTP by the official openai client. Only loopback traffic."""
import pytest
from serve_helpers import running_server


@pytest.fixture(scope="session")
def tiny_dir(kubetune_cache_dir):
    from kubetune.trainer.builtin import resolve_model_path

    return resolve_model_path("builtin://tiny")


@pytest.fixture(scope="session")
def references(tiny_dir, tmp_path_factory):
    """transformers' model and tokenizer for builtin://tiny, and two PEFT adapters (with their peft models)."""
    from serve_helpers import make_peft_adapter
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()
    folder = tmp_path_factory.mktemp("adapters")
    alpha = make_peft_adapter(base, folder / "alpha", seed=1, targets=["q_proj", "v_proj"], rank=4, alpha=8.0)
    beta = make_peft_adapter(base, folder / "beta", seed=2, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], rank=2, alpha=4.0)
    return {
        "tokenizer": AutoTokenizer.from_pretrained(str(tiny_dir)),
        "models": {"tiny": base, "alpha": alpha, "beta": beta},
        "adapter_dirs": {"alpha": folder / "alpha", "beta": folder / "beta"},
    }


@pytest.fixture(scope="module")
def api(tiny_dir, references):
    """The server as `kubetune serve builtin://tiny --adapter alpha=... --adapter beta=...` builds it."""
    import openai

    from kubetune.trainer.serve.app import ServeLimits
    from kubetune.trainer.serve.cli import build_app

    adapters = [(name, str(path)) for name, path in references["adapter_dirs"].items()]
    app = build_app(
        str(tiny_dir), adapters, served_model_name="tiny", max_concurrency=8, max_queue=256, device="cpu",
        limits=ServeLimits(allow_ignore_eos=True),
    )
    with running_server(app) as url:
        yield {"url": url, "app": app, "client": openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)}
