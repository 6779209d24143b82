"""The one place diffusion priors are loaded: local folders and Hugging Face Hub ids.

Loading is fail-fast by design. Other tools hand a hub id to `from_pretrained` and leave the user
watching minutes of retries, or get a silently empty tokenizer offline. Here:
  * a local folder must be a diffusers folder (model_index.json); its components are loaded from the
    `[library, class]` pairs in that file, so SD 1.x/2.x, DeepFloyd IF and our own pixel models all
    take the same path;
  * a hub id is looked up in the local cache first; if it is missing, or a download that stopped
    part-way left it incomplete, we either fail at once (HF_HUB_OFFLINE) or probe the endpoint with
    a 5 s socket connect before downloading (which finishes a partial download);
  * every failure is a PriorLoadError that names the model and says how to fix it.
The environment is read at call time: huggingface_hub snapshots HF_ENDPOINT / HF_HUB_OFFLINE when
it is imported, which would ignore a user's (or a test's) later change.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import socket
import threading
import urllib.parse
import urllib.request
from pathlib import Path

import torch


from text23d.errors import ConfigError, PriorLoadError
from text23d.prior.prior import Prior

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Components we load; everything else in model_index.json (safety_checker, feature_extractor,
# watermarker, image_encoder, ...) is ignored.
NEEDED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
LIBRARIES = ("diffusers", "transformers")
ADDITION_EMBED_TYPES = (None, "text")  # see _check_shapes
PROBE_TIMEOUT_S = 5.0
FOLDER_HINT = "prior.pretrained_model_name_or_path=/path/to/model"
BUILTIN_HINT = "or, to try text23d without any download, prior=builtin (the small prior it ships)"


def load_prior(
    pretrained_model_name_or_path: str,
    dtype: str = "float32",
    device="cpu",
    latent: bool | str | None = "auto",
    resolution: int | None = None,
    trainer_precision: str | None = None,
) -> Prior:
    """Load a frozen diffusion prior from a diffusers folder or a Hub id. See module docstring.

    dtype: float32 | float16 | bfloat16, or auto (see `auto_dtype`); trainer_precision: Lightning's
    `trainer.precision` (e.g. "bf16-mixed"), which auto follows.
    """
    _quiet_progress_bars()
    name = str(pretrained_model_name_or_path)
    torch_dtype, why = _check_dtype(dtype, device, trainer_precision)
    want_latent = _check_latent_flag(latent)
    model_dir, name = _resolve_model_dir(name)
    index = _read_model_index(model_dir, name)
    has_vae = isinstance(index.get("vae"), list) and index["vae"][0] is not None
    latent_mode = has_vae if want_latent is None else want_latent
    if latent_mode and not has_vae:
        raise PriorLoadError(
            f"prior '{name}' has no 'vae' in {model_dir / 'model_index.json'}, but latent=True was "
            "requested. Fix: use latent=auto (pixel-space models like DeepFloyd IF have no VAE), "
            "or point to a latent model such as Stable Diffusion."
        )
    for component in ("unet", "scheduler", "text_encoder", "tokenizer"):
        _component_entry(index, component, model_dir, name)  # fail now, not at the first prompt

    unet = _load_component(model_dir, index, "unet", name, torch_dtype)
    vae = _load_component(model_dir, index, "vae", name, torch_dtype) if latent_mode else None
    scheduler = _load_scheduler(model_dir, name)
    _check_shapes(name, unet, vae, latent_mode)
    if resolution is None:
        resolution = _native_resolution(unet, vae)
    elif not (isinstance(resolution, int) and resolution > 0):
        raise ConfigError(f"resolution={resolution!r} must be a positive integer (pixels), or null for native.")
    elif vae is not None and resolution % _vae_factor(vae):
        raise ConfigError(
            f"resolution={resolution} is not a multiple of the VAE factor {_vae_factor(vae)} of "
            f"prior '{name}'. Fix: pass a multiple of it, e.g. {_native_resolution(unet, vae)}."
        )

    log.info("prior %s: %s weights (%s)", name, str(torch_dtype).removeprefix("torch."), why)

    def load_text_side():  # called lazily by Prior.encode_text
        tokenizer = _load_component(model_dir, index, "tokenizer", name, None)
        _check_tokenizer(tokenizer, name, model_dir)
        encoder = _load_component(model_dir, index, "text_encoder", name, torch_dtype)
        return tokenizer, encoder

    return Prior(
        name=name,
        model_dir=model_dir,
        unet=unet,
        vae=vae,
        scheduler=scheduler,
        resolution=int(resolution),
        dtype=torch_dtype,
        device=torch.device(device),
        cache_key=_cache_key(name, model_dir),
        text_loader=load_text_side,
    )


# ---------------------------------------------------------------------------------------------
# Arguments


def _quiet_progress_bars() -> None:
    """Per-shard "Loading weights" bars from the libraries would interleave with our own progress."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def _check_dtype(dtype, device, trainer_precision=None) -> tuple[torch.dtype, str]:
    """(weights dtype, why: for the run log)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(
            f"prior device={device!r} is not a torch device ({err}). Fix: device=cpu or device=cuda"
        ) from err
    key = str(dtype).removeprefix("torch.")
    if key == "auto":
        caps = _cuda_capabilities(device) if device.type == "cuda" else {}
        key, why = auto_dtype(device.type, trainer_precision=trainer_precision, **caps)
        return DTYPES[key], f"prior.dtype=auto on {device.type}: {why}"
    if key not in DTYPES:
        raise ConfigError(
            f"prior dtype={dtype!r} is not supported: use auto or one of {sorted(DTYPES)}. "
            "Fix: prior.dtype=auto (float16 on CUDA, float32 on CPU) or prior.dtype=float32."
        )
    if key == "float16" and device.type == "cpu":
        raise ConfigError(
            "prior dtype='float16' on device 'cpu' is not supported (many CPU kernels lack half "
            "precision and it is slower). Fix: prior.dtype=float32, or run on a GPU (device=cuda)."
        )
    return DTYPES[key], f"prior.dtype={key}"


def auto_dtype(
    device_type: str,
    *,
    fast_fp16: bool = False,
    bf16_supported: bool = False,
    trainer_precision: str | None = None,
) -> tuple[str, str]:
    """What prior.dtype=auto loads: (dtype name, the reason in words). A pure rule, so it is tested
    on any machine; `_cuda_capabilities` supplies the flags on a GPU.

    * Not CUDA (cpu, mps, ...): float32. Half-precision CPU kernels are missing or slower, and
      diffusers' own default is the highest precision off the GPU.
    * CUDA and trainer.precision bf16-*: bfloat16, the format autocast computes in anyway (float16
      where the GPU has no bfloat16).
    * CUDA with fast float16 (tensor cores, compute capability >= 7.0): float16, as threestudio
      loads SD and IF: half the memory and time of float32, and SD/IF ship float16 weights.
    * CUDA without fast float16 (older than Volta): bfloat16 if the GPU has it, else float32:
      float16 without tensor cores is slow (1/64 speed on consumer Pascal cards).
    """
    if device_type != "cuda":
        return "float32", "float16/bfloat16 are for CUDA only"
    if str(trainer_precision or "").startswith("bf16"):
        if bf16_supported:
            return "bfloat16", f"trainer.precision={trainer_precision}"
        return "float16", f"trainer.precision={trainer_precision}, but this GPU has no bfloat16"
    if fast_fp16:
        return "float16", "this GPU has fast float16"
    if bf16_supported:
        return "bfloat16", "this GPU has no fast float16"
    return "float32", "this GPU has neither fast float16 nor bfloat16"


def _cuda_capabilities(device: torch.device) -> dict:
    """The flags `auto_dtype` needs, for this CUDA device: float16 tensor cores from compute
    capability 7.0 (Volta), native bfloat16 from 8.0 (Ampere) and on every ROCm GPU. Not
    torch.cuda.is_bf16_supported(): it asks the *current* device, and by default counts emulation."""
    if not torch.cuda.is_available():
        return {}  # the device itself fails clearly when the weights are moved onto it
    major, _ = torch.cuda.get_device_capability(device)
    return {"fast_fp16": major >= 7, "bf16_supported": major >= 8 or bool(torch.version.hip)}


def _check_latent_flag(latent) -> bool | None:
    if latent is None or latent == "auto":
        return None
    if isinstance(latent, bool):
        return latent
    raise ConfigError(f"prior latent={latent!r} is not allowed: use auto, true or false.")


# ---------------------------------------------------------------------------------------------
# Where the files are: local folder or Hugging Face Hub


def _resolve_model_dir(name: str) -> tuple[Path, str]:
    """Return (local folder, display name). Local paths become absolute; hub ids stay ids."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve(), str(path.resolve())
    if path.exists():
        raise PriorLoadError(
            f"prior '{name}' is a file, not a diffusers model folder. "
            f"Fix: point to the folder that contains model_index.json: {FOLDER_HINT}"
        )
    if not _looks_like_hub_id(name):
        raise PriorLoadError(
            f"prior '{name}' does not exist ({path.resolve()}) and is not a Hugging Face Hub id "
            f"(owner/name). Fix: check the path, or use an id such as "
            f"'stabilityai/stable-diffusion-2-1-base': {FOLDER_HINT}"
        )
    return Path(_hub_snapshot(name)), name


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
    return (
        len(parts) == 2
        and all(p and set(p) <= allowed and not p.startswith(".") for p in parts)
        and not name.startswith(("./", "../", "~"))
    )


def _hub_snapshot(repo_id: str) -> str:
    from huggingface_hub import snapshot_download

    cache_dir = _hub_cache_dir()
    try:  # the cache first, even online: no network round trip for a model we already have
        cached = snapshot_download(
            repo_id, allow_patterns=["model_index.json"], cache_dir=cache_dir, local_files_only=True
        )
    except Exception:  # not cached (LocalEntryNotFoundError and friends): go on below
        cached = None
    # A download that stopped part-way leaves model_index.json in the snapshot: finish it (online)
    # or say so (offline), rather than failing later as a "corrupt" component.
    missing = _missing_files(Path(cached), repo_id) if cached else []
    if cached and not missing:
        return cached
    # `hf` since huggingface_hub 1.0; older versions only have `huggingface-cli`.
    download_cmd = f"`hf download {repo_id}` (older huggingface_hub: `huggingface-cli download {repo_id}`)"
    not_local = f" (no local folder {Path(repo_id).resolve()} exists either)"
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        if cached:
            raise _incomplete(repo_id, cached, missing, "HF_HUB_OFFLINE=1 keeps it from being finished",
                              "unset HF_HUB_OFFLINE and run again (the download resumes where it stopped)",
                              download_cmd)
        raise PriorLoadError(
            f"prior '{repo_id}' is not in the local Hugging Face cache ({cache_dir}) and "
            f"HF_HUB_OFFLINE=1{not_local}. Download it on a machine with network ({download_cmd}) "
            f"and copy the cache, or point to a local folder: {FOLDER_HINT}; {BUILTIN_HINT}"
        )
    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    reason = _probe(endpoint)
    if reason and cached:
        raise _incomplete(repo_id, cached, missing, f"the hub endpoint {endpoint} that would finish it is "
                          f"unreachable ({reason})", "connect to the network and run again (the download "
                          "resumes where it stopped)", download_cmd)
    if reason:
        raise PriorLoadError(
            f"prior '{repo_id}' is not in the local Hugging Face cache ({cache_dir}) and the hub "
            f"endpoint {endpoint} is unreachable ({reason}){not_local}. Fix: connect to the network, or "
            f"download it elsewhere ({download_cmd}) and copy the cache, or point to a local "
            f"folder: {FOLDER_HINT}; {BUILTIN_HINT}. Set HF_HUB_OFFLINE=1 to skip this network check."
        )
    return _download(repo_id, endpoint, cache_dir)  # also finishes a partial one: files on disk are kept


def _incomplete(repo_id: str, folder: str, missing: list[str], why: str, fix: str, download_cmd: str):
    return PriorLoadError(
        f"prior '{repo_id}': the download in the Hugging Face cache is incomplete ({folder} lacks "
        f"{_listing(missing)}): an earlier download stopped part-way, and {why}. Fix: {fix}; or run "
        f"{download_cmd} on a machine with network and copy the cache; or point to a local "
        f"folder: {FOLDER_HINT}"
    )


def _listing(items: list[str], most: int = 6) -> str:
    shown = ", ".join(items[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")


def _download(repo_id: str, endpoint: str, cache_dir: str) -> str:
    from huggingface_hub import snapshot_download

    kwargs = dict(cache_dir=cache_dir, endpoint=endpoint)
    try:
        folder = snapshot_download(repo_id, allow_patterns=["model_index.json"], **kwargs)
        index = _read_model_index(Path(folder), repo_id)
        parts = _listed_components(index)
        # Configs, tokenizer files and safetensors weights only: never pickled .bin/.ckpt files,
        # and not the fp16/EMA duplicates that would double the download.
        patterns = ["model_index.json"] + [
            f"{c}/*.{ext}" for c in parts for ext in ("json", "txt", "model", "safetensors")
        ]
        ignore = ["*.fp16.*", "*.fp16-*", "*non_ema*", "*.ema.*"]
        folder = snapshot_download(repo_id, allow_patterns=patterns, ignore_patterns=ignore, **kwargs)
        missing = _missing_files(Path(folder), repo_id)
        if missing:
            raise PriorLoadError(
                f"prior '{repo_id}': the download from {endpoint} finished, but {folder} still lacks "
                f"{_listing(missing)}: the repository does not have them in the form text23d downloads "
                "(configs, tokenizer files and *.safetensors weights; never pickled .bin files, nor "
                "fp16/EMA variants alone). Fix: save the model with save_pretrained and point to that "
                f"folder: {FOLDER_HINT}"
            )
        return folder
    except PriorLoadError:
        raise
    except Exception as err:
        gated = type(err).__name__ in ("RepositoryNotFoundError", "GatedRepoError")
        fix = (
            "check the spelling; for a gated model accept its license on the hub and run "
            "`hf auth login` (older huggingface_hub: `huggingface-cli login`)"
            if gated
            else "retry, or download it elsewhere and copy the cache"
        )
        raise PriorLoadError(
            f"prior '{repo_id}' could not be downloaded from {endpoint}: {type(err).__name__}: "
            f"{_first_line(err)}. Fix: {fix}, or point to a local folder: {FOLDER_HINT}"
        ) from err


def _probe(endpoint: str) -> str | None:
    """Return None if a TCP connection to the endpoint (or its proxy) opens within 5 s, else why not.

    Runs in a daemon thread so that a hanging DNS lookup cannot exceed the timeout either.
    """
    url = urllib.parse.urlsplit(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and host and not urllib.request.proxy_bypass(host):
        proxy_url = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        host, port = proxy_url.hostname, proxy_url.port or 80
    if not host:
        return f"HF_ENDPOINT={endpoint!r} has no host name"
    result: list[str | None] = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
            result.append(None)
        except OSError as err:
            result.append(f"{host}:{port}: {err}")

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S + 0.5)
    return result[0] if result else f"{host}:{port}: no answer within {PROBE_TIMEOUT_S:.0f} s"


def _hub_cache_dir() -> str:
    if os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return os.path.expanduser(os.environ.get("HF_HUB_CACHE") or os.environ["HUGGINGFACE_HUB_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    home = os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def _env_true(key: str) -> bool:
    return os.environ.get(key, "").strip().upper() in ("1", "ON", "YES", "TRUE")


# ---------------------------------------------------------------------------------------------
# What is in the folder


def _read_model_index(model_dir: Path, name: str) -> dict:
    path = model_dir / "model_index.json"
    if not path.is_file():
        raise PriorLoadError(
            f"prior '{name}' is not a diffusers model folder: {path} is missing. Fix: point to the "
            "folder that holds model_index.json and the unet/, text_encoder/, tokenizer/, "
            f"scheduler/ subfolders (a pipeline saved with save_pretrained): {FOLDER_HINT}"
        )
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        assert isinstance(index, dict)
        return index
    except Exception as err:
        raise PriorLoadError(
            f"prior '{name}': {path} is not valid JSON ({_first_line(err)}). "
            "Fix: restore the file from the original model (re-download or re-save it)."
        ) from err


def _listed_components(index: dict) -> list[str]:
    """The components we load that model_index.json lists (IF has no vae; nulls are skipped)."""
    return [c for c in NEEDED if isinstance(index.get(c), list) and index[c][0] is not None]


def _missing_files(model_dir: Path, name: str) -> list[str]:
    """What a hub snapshot lacks of the files `_download` fetches, as "component/file" strings.

    huggingface_hub links a file into the snapshot only once it is complete, so a missing file means
    a download that stopped before it; a present one is whole.
    """
    index = _read_model_index(model_dir, name)
    missing = []
    for component in _listed_components(index):
        folder = model_dir / component
        if not folder.is_dir():
            need = [""]  # the whole folder: "vae/"
        elif component == "scheduler":
            need = [] if (folder / "scheduler_config.json").is_file() else ["scheduler_config.json"]
        elif component == "tokenizer":
            vocabulary = "vocabulary (tokenizer.json, vocab.json + merges.txt or *.model)"
            need = [] if _has_vocabulary(folder) else [vocabulary]
        else:
            weights = "diffusion_pytorch_model" if index[component][0] == "diffusers" else "model"
            need = [] if (folder / "config.json").is_file() else ["config.json"]
            need += _missing_weights(folder, weights)
        missing += [f"{component}/{file}" for file in need]
    return missing


def _has_vocabulary(folder: Path) -> bool:
    files = {p.name for p in folder.glob("*")} if folder.is_dir() else set()
    return bool(
        "tokenizer.json" in files
        or {"vocab.json", "merges.txt"} <= files  # BPE (CLIP)
        or any(f.endswith(".model") for f in files)  # sentencepiece (T5)
        or "vocab.txt" in files  # WordPiece
    )


def _missing_weights(folder: Path, stem: str) -> list[str]:
    """[] if the weights are whole: one file, or every shard a *.index.json names (IF's T5 is sharded).
    stem: diffusion_pytorch_model (diffusers) or model (transformers; pytorch_model in old folders)."""
    for base in (stem, "pytorch_model"):
        for ext in ("safetensors", "bin"):
            if (folder / f"{base}.{ext}").is_file():
                return []
            shard_index = folder / f"{base}.{ext}.index.json"
            if shard_index.is_file():
                try:
                    shards = set(json.loads(shard_index.read_text(encoding="utf-8"))["weight_map"].values())
                except Exception:
                    return [f"{shard_index.name} (unreadable)"]
                return sorted(s for s in shards if not (folder / s).is_file())
    return [f"{stem}.safetensors"]


def _component_entry(index: dict, component: str, model_dir: Path, name: str) -> tuple[str, str]:
    entry = index.get(component)
    if not (isinstance(entry, list) and len(entry) == 2 and entry[0] is not None):
        raise PriorLoadError(
            f"prior '{name}' has no '{component}' component in {model_dir / 'model_index.json'} "
            f"(found {entry!r}). Fix: use a full text-to-image diffusers pipeline folder with "
            "unet, text_encoder, tokenizer and scheduler."
        )
    library, cls = entry
    if library not in LIBRARIES:
        raise PriorLoadError(
            f"prior '{name}': component '{component}' comes from library {library!r}; only "
            f"{LIBRARIES} are allowed. Fix: re-save the model with standard components."
        )
    if not (model_dir / component).is_dir():
        raise PriorLoadError(
            f"prior '{name}': component folder {model_dir / component} is missing. Fix: re-download "
            "the model, or copy the missing folder from the original."
        )
    return library, cls


def _load_component(model_dir: Path, index: dict, component: str, name: str, torch_dtype):
    library, cls_name = _component_entry(index, component, model_dir, name)
    kwargs = {"subfolder": component, "local_files_only": True}
    if library == "diffusers" and importlib.util.find_spec("accelerate") is None:
        kwargs["low_cpu_mem_usage"] = False  # its default; saying so silences a warning per component
    if torch_dtype is not None:
        # diffusers accepts torch_dtype everywhere; transformers 5 renamed it to dtype (>= 4.56).
        kwargs[_dtype_kwarg(library)] = torch_dtype
    try:
        cls = getattr(importlib.import_module(library), cls_name)
        module = cls.from_pretrained(str(model_dir), **kwargs)
    except Exception as err:
        raise PriorLoadError(
            f"prior '{name}': component '{component}' ({library}.{cls_name}) failed to load from "
            f"{model_dir / component}: {type(err).__name__}: {_first_line(err)}. Fix: the files are "
            "corrupt or incomplete; re-download the model (or re-save it with save_pretrained)."
        ) from err
    if isinstance(module, torch.nn.Module):
        module.requires_grad_(False).eval()  # frozen: the prior is never trained here
    return module


def _dtype_kwarg(library: str) -> str:
    if library == "transformers":
        import transformers
        from packaging.version import Version

        if Version(transformers.__version__).release >= (4, 56):
            return "dtype"
    return "torch_dtype"


def _load_scheduler(model_dir: Path, name: str):
    # DDPM whatever the pipeline shipped (PNDM for SD): we need only the training schedule ᾱ_t,
    # and DDPMScheduler reads the same beta/prediction-type keys from any scheduler config.
    from diffusers import DDPMScheduler

    try:
        return DDPMScheduler.from_pretrained(str(model_dir), subfolder="scheduler", local_files_only=True)
    except Exception as err:
        raise PriorLoadError(
            f"prior '{name}': component 'scheduler' failed to load from {model_dir / 'scheduler'}: "
            f"{type(err).__name__}: {_first_line(err)}. Fix: restore scheduler/scheduler_config.json."
        ) from err


def _check_tokenizer(tokenizer, name: str, model_dir: Path) -> None:
    # transformers may "load" a tokenizer whose files are missing as an empty one that maps every
    # word to the unknown token: the run would then silently ignore the prompt.
    special = set(tokenizer.all_special_ids)
    real = [i for i in tokenizer("a", add_special_tokens=False).input_ids if i not in special]
    if len(tokenizer) <= 3 or not real:
        raise PriorLoadError(
            f"prior '{name}': the tokenizer in {model_dir / 'tokenizer'} loaded empty (vocabulary "
            f"size {len(tokenizer)}, 'a' encodes to no real token): its vocabulary files are missing "
            "or unreadable. Fix: re-download the model, or copy the tokenizer/ folder from the original."
        )


def _check_shapes(name: str, unet, vae, latent: bool) -> None:
    # DeepFloyd IF's "text" embedding pools the same text embeddings the UNet cross-attends to, so it
    # needs no extra input; the others need inputs we do not have (SDXL's "text_time": pooled CLIP
    # embeddings and image-size ids; Kandinsky's "image"/"text_image": CLIP image embeddings).
    extra = getattr(unet.config, "addition_embed_type", None)
    if extra not in ADDITION_EMBED_TYPES:
        raise PriorLoadError(
            f"prior '{name}': its UNet needs extra conditioning (addition_embed_type={extra!r}, e.g. "
            f"SDXL's 'text_time'), which is not supported; allowed: {ADDITION_EMBED_TYPES}. "
            "Fix: use SD 1.x/2.x, DeepFloyd IF stage I or a pixel model."
        )
    channels = unet.config.in_channels
    if latent and channels != vae.config.latent_channels:
        raise PriorLoadError(
            f"prior '{name}': UNet in_channels={channels} does not match the VAE's latent_channels="
            f"{vae.config.latent_channels}. Fix: the unet/ and vae/ folders come from different "
            "models; restore them from one model."
        )
    if not latent and channels != 3:
        raise PriorLoadError(
            f"prior '{name}': pixel mode needs a UNet on 3-channel images, but in_channels={channels}. "
            "Fix: use latent=auto for a latent model (with a vae/ folder)."
        )


def _vae_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _native_resolution(unet, vae) -> int:
    size = unet.config.sample_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    return int(size) * (_vae_factor(vae) if vae is not None else 1)


def _cache_key(name: str, model_dir: Path) -> str:
    """Changes when the text side changes: file names, sizes, mtimes and the config contents."""
    digest = hashlib.sha256()
    for sub in ("text_encoder", "tokenizer"):
        for path in sorted((model_dir / sub).glob("*")):
            if path.is_file():
                stat = path.stat()
                digest.update(f"{sub}/{path.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    config = model_dir / "text_encoder" / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    return f"{name}@{digest.hexdigest()[:16]}"


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0].rstrip(".") if text else "(no message)"
