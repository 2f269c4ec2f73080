"""EA's decoding step and whole-map conv on a CPU in one pass (``ea_fairseq/csrc/ea_step.cpp``).

With PyTorch ops, a decoding step of an EA layer is about ten small ops (the conv's
window zeroed, the previous rows gathered into it in the beam's order, the mix, a
matmul, the shifted adds, the key mask), each a pass over cold memory inside a decoder
step; together they cost a few per cent of a CPU beam search. ``step`` does the same
arithmetic in one pass per hypothesis (see the C++ file). It covers the usual case: a
CPU, float32 or float64, one new query row, a linear activation and no autograd.

In training, a layer's map goes through the mix, the conv's padding, the conv, the lerp
and the mask: five passes, and oneDNN's conv for as few channels as heads writes its
output with the channels padded to 16 (four times the bytes, then a reorder), which on
the 2-core VM costs 1.5 ms hot and, now and then, 20 to 40 ms in a training step.
``evolve_map`` does all of it in one pass (about 1 ms for a 29 x 4 x 73 x 77 map), and
the backward's input gradient, the same conv with the weights transposed, in another.
It covers linear activations in float32 / float64 on a CPU.

``EvolvingMultiheadAttention`` takes the PyTorch ops everywhere else, where
``one_pass`` is False, and where the library is not there.

The library is built on first use with the system's C++ compiler (``$CXX``, else
``c++`` / ``g++`` / ``clang++``), in about a second, and cached under
``$EA_FAIRSEQ_KERNEL_DIR`` (default ``~/.cache/ea-fairseq/kernels``), one file per
source, compiler and CPU (it is built for the CPU it runs on). ``scripts/install.sh``
builds it. It is loaded through ctypes: no torch headers, no dependence on torch's C++
ABI. ``$EA_FAIRSEQ_STEP_KERNEL``: ``auto`` (default: build and use it, else warn once
and use the PyTorch ops), ``off`` (never), ``require`` (fail where it cannot be built);
read once per process (``reset`` reads it again).
"""

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "ea_step.cpp"
ENV_MODE = "EA_FAIRSEQ_STEP_KERNEL"
ENV_DIR = "EA_FAIRSEQ_KERNEL_DIR"
MODES = ("auto", "off", "require")
ABI_VERSION = 2
DTYPES = {torch.float32: "ea_step_float", torch.float64: "ea_step_double"}
MAP_DTYPES = {torch.float32: "ea_map_float", torch.float64: "ea_map_double"}
# -march=native first (the file is cached per CPU), then portable flags
FLAG_SETS = (["-O3", "-march=native", "-fopenmp-simd"], ["-O3"])

_lock = threading.Lock()
_state = {"key": None, "lib": None}  # the settings load() read (None: not yet), and what it found


def mode() -> str:
    value = os.environ.get(ENV_MODE, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV_MODE}={os.environ[ENV_MODE]!r}: expected one of {', '.join(MODES)}")
    return value


def cache_dir() -> Path:
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ea-fairseq" / "kernels"


def compiler() -> Optional[str]:
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"]) or os.environ["CXX"]
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's feature flags where Linux lists them."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build(verbose: bool = False) -> Path:
    """The shared library for this source, compiler and CPU: built unless it is cached.
    Raises RuntimeError (with the compiler's messages) where no build succeeds."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++ or clang++)")
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"the C++ compiler {cxx} does not run: {e}") from e
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), cxx.encode(), version.encode(), repr(FLAG_SETS).encode(),
                 _cpu_id().encode(), platform.machine().encode()):
        key.update(part)
        key.update(b"\0")
    folder = cache_dir()
    target = folder / f"ea_step-{key.hexdigest()[:20]}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    errors = []
    try:
        for flags in FLAG_SETS:
            cmd = [cxx, "-shared", "-fPIC", "-std=c++14", *flags, str(SOURCE), "-o", str(tmp)]
            if verbose:
                logger.info("building EA's decoding step: %s", " ".join(cmd))
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.SubprocessError) as e:
                errors.append(f"{' '.join(cmd)}: {e}")
                continue
            if done.returncode == 0:
                os.replace(tmp, target)  # whole or not at all, also with builds side by side
                return target
            errors.append(f"{' '.join(cmd)} (exit {done.returncode}):\n{done.stderr.strip()[-2000:]}")
    finally:
        if tmp.exists():
            tmp.unlink()
    raise RuntimeError("building " + str(SOURCE) + " failed:\n" + "\n".join(errors))


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.ea_step_abi_version.restype = ctypes.c_int64
    if lib.ea_step_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{path}: ABI version {lib.ea_step_abi_version()}, expected {ABI_VERSION}")
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    args = ([i64] * 4 + [ptr] + [i64] * 3 + [ptr] + [i64] * 3 + [ctypes.c_double] + [ptr] + [i64] * 2
            + [ptr] + [i64] * 6 + [ptr] * 5)
    for name in DTYPES.values():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, i64
    map_args = ([i64] * 7 + [ptr] + [i64] * 3 + [ptr] + [i64] * 3 + [ctypes.c_double] + [ptr] + [i64] * 3
                + [ptr] * 3 + [i64] * 3 + [ptr] + [i64] * 3)
    for name in MAP_DTYPES.values():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = map_args, None
    return lib


def reset() -> None:
    """Forget what ``load`` found, so that its next call reads the settings again (the
    environment variables above, $CXX, $XDG_CACHE_HOME): they are read once per process."""
    with _lock:
        _state.update(key=None, lib=None)


def load() -> Optional[ctypes.CDLL]:
    """The library, built on first use (None where ``$EA_FAIRSEQ_STEP_KERNEL`` is ``off``
    or, with ``auto``, where it cannot be built: a warning says why, once)."""
    if _state["key"] is not None:  # tried already (each decoding step asks)
        return _state["lib"]
    with _lock:
        current = (mode(), os.environ.get("CXX"), os.environ.get(ENV_DIR), os.environ.get("XDG_CACHE_HOME"))
        if _state["key"] is not None:
            return _state["lib"]
        lib = None
        if current[0] != "off":
            try:
                lib = _open(build())
            except (OSError, RuntimeError) as e:
                if current[0] == "require":
                    raise RuntimeError(f"{ENV_MODE}=require: EA's one-pass CPU kernels are not available: {e}") from e
                logger.warning(
                    "EA's one-pass CPU kernels (decoding steps, training maps) could not be built, so CPU "
                    "decoding and training use PyTorch ops instead (the same results, a few per cent "
                    "slower); set %s=off to skip trying. %s",
                    ENV_MODE, e)
        _state.update(key=current, lib=lib)
        return lib


def applies(logits: Tensor) -> bool:
    """Whether ``step`` takes maps like ``logits`` (B, H, 1, T) here."""
    return (logits.device.type == "cpu" and logits.dtype in DTYPES and logits.size(2) == 1
            and logits.numel() > 0 and load() is not None)


def step(logits: Tensor, prev: Optional[Tensor], beta: float, keep: Optional[Tensor],
         history: Optional[Tensor], order: Optional[Tensor], taps: Tensor, bias: Tensor,
         kernel_size: int) -> Tuple[Tensor, Tensor]:
    """One decoding step of a causal EA layer with a linear activation, without autograd:
    the same as ``EAConv.step_window`` + ``_mix`` + ``EAConv.evolve_step`` + the key
    mask. logits, prev (B, H, 1, T); keep broadcastable to (B, 1, 1, T), or None;
    history (H, k-1, B', T'), T' <= T, or None; order (B,) into B', or None (B' = B);
    taps, bias as ``EAConv.step_taps`` makes them. Returns (A's new rows (B, H, 1, T),
    keep-masked; the rows for the next step (H, k-1, B, T)). Call where ``applies``."""
    lib = _state["lib"]  # as ``applies`` found it
    bsz, heads, tgt_len, src_len = logits.shape
    k, dtype = kernel_size, logits.dtype
    if tgt_len != 1 or lib is None or dtype not in DTYPES:
        raise ValueError(f"step_kernel.step: maps {tuple(logits.shape)} {dtype} are not one {list(DTYPES)} row")

    def same(t: Tensor, what: str, shape) -> Tensor:
        if t.dtype != dtype or t.device != logits.device or tuple(t.shape) != tuple(shape):
            raise ValueError(f"step_kernel.step: {what} is {tuple(t.shape)} {t.dtype} {t.device}, "
                             f"expected {tuple(shape)} {dtype} {logits.device}")
        return t

    l_st = logits.stride()
    p_ptr, p_st = 0, (0, 0, 0, 0)
    if prev is not None and beta > 0:
        same(prev, "prev", logits.shape)
        p_ptr, p_st = prev.data_ptr(), prev.stride()
    q_ptr, q_st = 0, (0, 0, 0, 0)
    if keep is not None:
        keep = same(keep.to(dtype), "keep", keep.shape).expand(bsz, 1, 1, src_len)
        q_ptr, q_st = keep.data_ptr(), keep.stride()
    h_ptr, h_bsz, h_len, h_st = 0, bsz, 0, (0, 0, 0, 0)
    if history is not None:
        if history.dim() != 4:
            raise ValueError(f"step_kernel.step: history is {tuple(history.shape)}, expected (H, k-1, B', T')")
        h_bsz, h_len = history.size(2), history.size(3)
        same(history, "history", (heads, k - 1, h_bsz, min(h_len, src_len)))
        h_ptr, h_st = history.data_ptr(), history.stride()
    o_ptr = 0
    if order is not None:
        if order.dtype != torch.int64 or order.shape != (bsz,) or order.device != logits.device:
            raise ValueError(f"step_kernel.step: order is {tuple(order.shape)} {order.dtype}, expected ({bsz},) int64")
        order = order.contiguous()
        o_ptr = order.data_ptr()
    elif h_bsz != bsz:
        raise ValueError(f"step_kernel.step: history has {h_bsz} hypotheses and no order maps {bsz} onto them")
    taps = same(taps, "taps", (k * heads, heads * k)).contiguous()
    bias = same(bias, "bias", (k * heads, 1)).contiguous()
    out = logits.new_empty(bsz, heads, 1, src_len)
    # laid out per hypothesis, so that the next step's gather in the beam's order reads one
    # block per hypothesis; (H, k-1, B, T) as a view, as EAConv.step_window takes it
    rows = logits.new_empty(bsz, heads, k - 1, src_len).permute(1, 2, 0, 3)
    bad = getattr(lib, DTYPES[dtype])(
        bsz, heads, src_len, k,
        logits.data_ptr(), l_st[0], l_st[1], l_st[3],
        p_ptr, p_st[0], p_st[1], p_st[3], float(beta),
        q_ptr, q_st[0], q_st[3],
        h_ptr, h_bsz, h_len, *h_st,
        o_ptr, taps.data_ptr(), bias.data_ptr(), out.data_ptr(), rows.data_ptr())
    if bad:
        raise IndexError(f"evolving attention: the beam's order gives hypothesis {bad - 1} the index "
                         f"{int(order[bad - 1])}, out of range for {h_bsz} cached hypotheses")
    return out, rows


def map_applies(maps: Tensor) -> bool:
    """Whether ``evolve_map`` takes maps like ``maps`` (B, H, Tq, Tk) here."""
    return maps.device.type == "cpu" and maps.dtype in MAP_DTYPES and maps.numel() > 0 and load() is not None


def evolve_map(s: Tensor, prev: Optional[Tensor], beta: float, keep: Optional[Tensor], taps: Tensor,
               bias: Optional[Tensor], kernel_size: int, top: int, m_out: Optional[Tensor] = None) -> Tensor:
    """A whole map's conv in one pass, without autograd (training's forward and backward):
    out = (bias + conv(X, taps)) * keep, X = lerp(s, prev, beta) * keep, zero-padded with
    ``top`` rows above the map and k-1-top below, k/2 columns either side; X written into
    ``m_out`` where given (a (B, H, Tq, Tk) view, keys at unit stride). s, prev
    (B, H, Tq, Tk); keep broadcastable to (B, 1, Tq, Tk) or None; taps (k*H, H*k) as
    ``EAConv.step_taps`` lays them out, bias (H,) or None. Returns out (B, H, Tq, Tk),
    contiguous. Call where ``map_applies``."""
    lib = load()
    bsz, heads, tgt_len, src_len = s.shape
    k, dtype = kernel_size, s.dtype
    if lib is None:
        raise RuntimeError(f"step_kernel.evolve_map: the library is not there ({ENV_MODE}={mode()})")
    if s.device.type != "cpu" or dtype not in MAP_DTYPES or not 0 <= top < k:
        raise ValueError(f"step_kernel.evolve_map: maps {tuple(s.shape)} {dtype} on {s.device}, "
                         f"top {top} of kernel {k}: expected float32 / float64 on the CPU, 0 <= top < k")

    def rows(t: Optional[Tensor], what: str) -> Optional[Tensor]:
        if t is None:
            return None
        if t.dtype != dtype or t.device != s.device or tuple(t.shape) != tuple(s.shape):
            raise ValueError(f"step_kernel.evolve_map: {what} is {tuple(t.shape)} {t.dtype}, "
                             f"expected {tuple(s.shape)} {dtype}")
        return t if t.stride(3) == 1 else t.contiguous()

    s = rows(s, "s")
    prev = rows(prev, "prev") if beta > 0 else None
    if m_out is not None and (rows(m_out, "m_out") is not m_out):
        raise ValueError("step_kernel.evolve_map: m_out must have its keys at unit stride")
    q_ptr, q_st = 0, (0, 0, 0, 0)
    if keep is not None:
        keep = keep.to(dtype).expand(bsz, 1, tgt_len, src_len)
        q_ptr, q_st = keep.data_ptr(), keep.stride()
    taps = taps.to(dtype).contiguous()
    if tuple(taps.shape) != (k * heads, heads * k):
        raise ValueError(f"step_kernel.evolve_map: taps {tuple(taps.shape)}, expected {(k * heads, heads * k)}")
    b_ptr = 0
    if bias is not None:
        bias = bias.to(dtype).contiguous()
        b_ptr = bias.data_ptr()
    out = s.new_empty(bsz, heads, tgt_len, src_len)
    p_ptr, p_st = (0, (0, 0, 0, 0)) if prev is None else (prev.data_ptr(), prev.stride())
    m_ptr, m_st = (0, (0, 0, 0, 0)) if m_out is None else (m_out.data_ptr(), m_out.stride())
    s_st, o_st = s.stride(), out.stride()
    # one thread: splitting the hypotheses over torch's threads (ctypes lets go of the GIL)
    # measured no faster on the 2-core VM, where one pass is bound by memory
    getattr(lib, MAP_DTYPES[dtype])(
        0, bsz, heads, tgt_len, src_len, k, top,
        s.data_ptr(), s_st[0], s_st[1], s_st[2],
        p_ptr, p_st[0], p_st[1], p_st[2], float(beta),
        q_ptr, q_st[0], q_st[2], q_st[3], taps.data_ptr(), b_ptr,
        m_ptr, m_st[0], m_st[1], m_st[2], out.data_ptr(), o_st[0], o_st[1], o_st[2])
    return out
