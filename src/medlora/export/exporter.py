"""`medlora export`: a run (its adapter merged in memory), a merged folder or an HF model folder as one GGUF file
(``gguf.py``) with an Ollama Modelfile beside it (``modelfile.py``); and the cached exports that chat, eval and
serve run in llama.cpp."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import MedloraError, log
from ..files import check_output_file
from ..prompts import DEFAULT_SYSTEM_PROMPT
from ..rundir import MODELFILE, RunDir, not_a_folder
from .gguf import DEFAULT_QUANT, QUANTS, NotExportable, write_gguf
from .modelfile import write_modelfile
from .q4_0 import activation_importance, calibration_tokens


def check_gguf_output(out: Path) -> None:
    """--output names a .gguf file; an existing file there is replaced only if it is a GGUF (an export made
    before), never a user's other file."""
    check_output_file(out, "--output")
    if out.suffix.lower() != ".gguf":
        raise MedloraError(f"--output {out}: give a file name ending in .gguf")
    if out.exists():
        try:
            with open(out, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise MedloraError(f"--output {out}: cannot read the existing file ({e.strerror})") from None
        if magic != b"GGUF":
            raise MedloraError(f"--output {out} exists and is not a GGUF file; medlora will not overwrite it: "
                               "give another name or move it away")
        log(f"replacing the GGUF file {out}")


def export(target: str | Path, quant: str = DEFAULT_QUANT, output: str | Path | None = None,
           trust_remote_code: bool = False, progress: bool = True, modelfile: bool = True,
           announce: str | None = None, user_output: bool = True) -> Path:
    """Export a run folder (its adapter merged in memory), its merged_model/ or any HF model folder. Default
    output: RUN/export/RUN-QUANT.gguf (for a plain model folder, FOLDER/export/FOLDER-QUANT.gguf).
    ``user_output``: ``output`` is the user's --output (checked as such); False for the cached exports."""
    from ..model import load_model, load_run_model, load_tokenizer

    if quant not in QUANTS:
        raise MedloraError(f"unknown quantization {quant!r}; choose {', '.join(QUANTS)}")
    path = Path(target)
    if not path.is_dir():
        raise not_a_folder(path)
    run = RunDir(path)  # a run, or a run at one of its checkpoints
    if run.is_finished_run():
        home = run
    elif (path / "config.json").is_file():
        merged = RunDir.is_merged_model(path)  # a run's merged_model/: the run names the file and the prompt
        home = RunDir.home(path)
    else:
        raise run.not_a_run(" nor a model folder (no config.json)")
    name = home.name
    out = Path(output) if output else home.export_dir / f"{name}-{quant}.gguf"
    # before the model loads (seconds to minutes), not after
    if output and user_output:
        check_gguf_output(out)
    else:
        check_output_file(out, "export")
    if home is run:
        peft_model, tokenizer, _ = load_run_model(run, trust_remote_code=trust_remote_code)
        model = peft_model.merge_and_unload()
        prompt = run.system_prompt() or DEFAULT_SYSTEM_PROMPT
    else:
        model, tokenizer = load_model(str(path), trust_remote_code), load_tokenizer(str(path), trust_remote_code)
        prompt = (home.system_prompt() if merged else None) or DEFAULT_SYSTEM_PROMPT
    if announce:  # once the model has loaded: a model that cannot load reports that alone, in one line
        log(announce)
    importance = None
    if quant == "q4_0":
        tokens, source = calibration_tokens(home if home.is_finished_run() else None, tokenizer)
        if tokens:
            log(f"q4_0: weighting the quantization error by activations on {source}")
            importance = activation_importance(model, tokens, progress)
        else:
            log(f"q4_0: no calibration data ({source}); plain round-to-nearest q4_0")
    write_gguf(model, tokenizer, out, quant, name=name, progress=progress, importance=importance,
               system_prompt=prompt)
    if modelfile:
        write_modelfile(out, tokenizer, prompt, home.tag)
    return out


def _newest_mtime(folder: Path) -> float:
    return max((f.stat().st_mtime for f in folder.rglob("*") if f.is_file()), default=0.0)


def cached_export(target: str | Path | None, quant: str = DEFAULT_QUANT, model: str | None = None,
                  trust_remote_code: bool = False) -> Path:
    """The GGUF that the llama.cpp backend runs for ``target``, exported on first use and reused after:

    * a run folder: RUN/export/RUN-QUANT.gguf, the file `medlora export` writes (exported again when the adapter
      is newer than it, e.g. after --resume trained on);
    * a run's merged model: the same file as its run (the merged folder's own, in the cache, where the adapter
      changed after the merge);
    * a run folder that cannot be written to (read-only): a file in medlora's cache;
    * any other HF model folder, or (``target`` None) the base model ``model`` by name: a file in medlora's
      cache, so a user's model folder is never written to.
    """
    from ..model import cache_dir, resolve_model

    if target is None:
        if model is None:
            raise MedloraError("give a run folder or --model")
        folder = Path(resolve_model(model))
        if not (folder / "config.json").is_file():
            raise NotExportable(f"{model}: not a local model folder, cannot export it to GGUF")
    else:
        folder = Path(target)
        run = RunDir.home(folder)
        # a merged model is its run's adapter merged in: the run's file serves it, unless the adapter changed
        # since the merge (--resume trained on), when the merged folder is exported on its own, below
        stale_merge = folder != run.path and run.is_finished_run() and \
            _newest_mtime(folder) < _newest_mtime(run.adapter_dir)
        if run.is_finished_run() and not stale_merge:
            out = run.export_dir / f"{run.name}-{quant}.gguf"
            try:
                check_output_file(out, "export")
            except MedloraError:  # a read-only run folder: the export goes to medlora's cache instead
                folder = run.path
            else:
                if not out.is_file() or out.stat().st_mtime < _newest_mtime(run.adapter_dir):
                    # the run's Modelfile stays as `medlora export` last wrote it (perhaps for another quant)
                    export(str(run), quant, out, trust_remote_code, user_output=False,
                           modelfile=not (run.export_dir / (MODELFILE + run.tag)).exists(),
                           announce=f"exporting {run} to {out} for llama.cpp (once; `medlora export` writes the "
                           "same file)")
                return out
    resolved = folder.resolve()
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:10]
    out = cache_dir() / "gguf" / f"{resolved.name}-{digest}-{quant}.gguf"
    if not out.is_file() or out.stat().st_mtime < _newest_mtime(resolved):
        export(resolved, quant, out, trust_remote_code, modelfile=False, user_output=False,
               announce=f"exporting {resolved} to {out} for llama.cpp (once)")
    return out
