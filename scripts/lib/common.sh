# shellcheck shell=bash
# Helpers shared by the recipes in scripts/. Source it; it defines functions only
# (and EA_REPO), it runs nothing.

EA_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export EA_REPO

log() { printf '%s | INFO | %s | %s\n' "$(date '+%Y-%m-%d %H:%M:%S')" "${EA_STEP:-ea-fairseq}" "$*" >&2; }
die() { printf '%s | ERROR | %s | %s\n' "$(date '+%Y-%m-%d %H:%M:%S')" "${EA_STEP:-ea-fairseq}" "$*" >&2; exit 1; }

# Use the Python environment the user already has active (virtualenv or conda),
# or EA_PYTHON if given; otherwise create/activate the project's own venv
# (EA_VENV, default .venv in the repository). Sets PYTHON.
ea_activate_env() {
  if [[ -n "${EA_PYTHON:-}" ]]; then
    PYTHON=$EA_PYTHON
  elif [[ -n "${VIRTUAL_ENV:-}" || -n "${CONDA_PREFIX:-}" ]]; then
    PYTHON=python
  else
    local venv=${EA_VENV:-$EA_REPO/.venv}
    if [[ ! -x "$venv/bin/python" ]]; then
      command -v python3 >/dev/null || die "python3 not found: install Python 3.10-3.13 first (pyenv, or your distribution's python3.1x; or set EA_PYTHON)"
      log "creating virtual environment $venv"
      python3 -m venv "$venv" || die "could not create a virtual environment in $venv (Debian: apt-get install python3-venv)"
    fi
    # shellcheck disable=SC1091
    source "$venv/bin/activate"
    PYTHON=python
  fi
  export PYTHON
}

# require_cmd NAME [HINT]: stop with a clear message if a tool is missing.
require_cmd() {
  command -v "$1" >/dev/null 2>&1 || die "required tool '$1' not found${2:+: $2}"
}

# The number of GPUs torch sees. Where the machine has no GPU device node (NVIDIA's
# /dev/nvidia0..., AMD's /dev/kfd, WSL's /dev/dxg) no GPU is usable, and the answer is 0
# without starting torch (which takes a few seconds of CPU).
ea_gpu_count() {
  if compgen -G '/dev/nvidia[0-9]*' >/dev/null || [[ -e /dev/kfd || -e /dev/dxg ]]; then
    "$PYTHON" -c 'import torch; print(torch.cuda.device_count())'
  else
    echo 0
  fi
}

# Is the project installed in the active environment (patched fairseq + ea_fairseq)?
ea_installed() {
  "$PYTHON" - "$EA_REPO" <<'PY' >/dev/null 2>&1
import importlib.metadata as md, subprocess, sys
repo = sys.argv[1]
want = subprocess.check_output([sys.executable, f"{repo}/scripts/fairseq_patches.py", "--version"], text=True).strip()
assert md.version("fairseq") == want
md.version("ea-fairseq")
import importlib.util
assert importlib.util.find_spec("ea_fairseq")
PY
}

# --- data recipes ---------------------------------------------------------------

# textprep SUBCOMMAND ARGS...: the recipes' text steps (scripts/lib/textprep.py)
textprep() { "$PYTHON" "$EA_REPO/scripts/lib/textprep.py" "$@"; }

# textprep_in FILE SUBCOMMAND ARGS...: a textprep filter reading FILE, whose
# messages (invalid UTF-8 at line N) name FILE
textprep_in() {
  local f=$1
  shift
  # shellcheck disable=SC2094  # FILE is only read
  textprep --input-name "$f" "$@" <"$f"
}

# glibc settings that keep freed memory in the process's heap for reuse (the same as
# benchmarks/cost.py's --heap keep): without them glibc maps every allocation over its mmap
# threshold (at most 32 MiB) fresh from the kernel and unmaps it when freed, so a CPU run
# faults in the output layer's ~100 MB tensors anew at every update (docs/performance.md)
EA_KEEP_HEAP_TUNABLES="glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184"

# Add EA_KEEP_HEAP_TUNABLES to GLIBC_TUNABLES for the processes started from here on, unless
# KEEP_HEAP=0 or GLIBC_TUNABLES already sets an mmap threshold. Returns 1 where it added nothing.
ea_keep_heap() {
  [[ "${KEEP_HEAP:-1}" != 0 && "${GLIBC_TUNABLES:-}" != *glibc.malloc.mmap_threshold* ]] || return 1
  export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}$EA_KEEP_HEAP_TUNABLES"
}

n_lines() { wc -l <"$1" | tr -d ' '; }

# require_file PATH [HINT]
require_file() { [[ -s "$1" ]] || die "missing or empty file: $1${2:+ ($2)}"; }

# require_int NAME MIN: the variable NAME holds a whole number >= MIN (bash would
# otherwise read "abc" as a variable name in arithmetic, and -5 as a number).
require_int() {
  local name=$1 min=$2 value=${!1-}
  if [[ ! "$value" =~ ^[0-9]+$ ]] || ((10#$value < min)); then
    die "$name=$value: expected a whole number >= $min"
  fi
}

# warn_blank WHAT FILE...: count whitespace-only lines (kept: test sets stay aligned).
warn_blank() {
  local what=$1
  shift
  textprep blank-lines --what "$what" "$@"
}

# same_lines A B: both files exist and have the same number of lines.
same_lines() {
  require_file "$1"
  require_file "$2"
  local a b
  a=$(n_lines "$1")
  b=$(n_lines "$2")
  [[ "$a" == "$b" ]] || die "line counts differ: $1 has $a lines, $2 has $b"
}

# Steps are idempotent: a finished step leaves a marker in $MARKERS (set by the
# recipe) and is skipped next time. Every step writes temporaries and renames
# them at the end, so an interrupted step leaves nothing that looks done.
step_done() { [[ -f "$MARKERS/$1" ]]; }
mark_done() { mkdir -p "$MARKERS"; : >"$MARKERS/$1"; }

# fetch URL DEST: download unless DEST exists (the download cache). OFFLINE=1
# forbids the network: then DEST must already be there.
fetch() {
  local url=$1 dest=$2
  if [[ -s "$dest" ]]; then
    log "using $dest"
    return
  fi
  [[ "${OFFLINE:-0}" != 1 ]] || die "$dest not found and OFFLINE=1 (put the file there, or allow downloads)"
  mkdir -p "$(dirname "$dest")"
  log "downloading $url -> $dest"
  "$PYTHON" - "$url" "$dest.part" <<'PY' || die "download failed: $url"
import shutil, sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=60) as r, open(sys.argv[2], "wb") as f:
    shutil.copyfileobj(r, f, length=1 << 20)
PY
  mv "$dest.part" "$dest"
}

# require_python_module MODULE [HINT]
require_python_module() {
  "$PYTHON" -c "import $1" 2>/dev/null || die "Python module '$1' not found${2:+: $2} (run scripts/install.sh)"
}

# recipe_start: the common opening of the prepare-* recipes (after their variables):
# Python environment, tools checked before any work, then FORCE=1 / "already prepared".
# The settings that shape the output (BPE, BPE_TOKENS and the recipe's RECIPE_SETTINGS)
# are recorded with the step markers and in $DEST/PREPARED: finished steps are reused
# only under the same settings, and a $DEST made with others is not taken as done.
# Exits 0 when $DEST is complete for these settings and FORCE is not set.
# The recipe's input files (INPUTS, an array set by the recipe: archives, corpora)
# are part of the fingerprint too: their paths, sizes and modification times are
# recorded ($MARKERS/inputs.json, then $DEST/INPUTS.json), and other inputs (another
# MULTI30K_DIR, an edited file) redo every step. Leftovers of interrupted
# binarisations ($DEST.tmp.<pid> of a process that is gone) are removed first.
# shellcheck disable=SC2153  # DEST, MARKERS and TMP are the calling recipe's variables
recipe_start() {
  ea_activate_env
  recipe_tools
  remove_stale_tmp "$DEST"
  SETTINGS="bpe=$BPE bpe_tokens=$BPE_TOKENS${RECIPE_SETTINGS:+ $RECIPE_SETTINGS}"
  local why
  if [[ "${FORCE:-0}" == 1 ]]; then
    rm -rf "$MARKERS"
  elif [[ -f "$DEST/PREPARED" ]]; then
    local have
    have=$(sed -n 's/^settings=//p' "$DEST/PREPARED")
    [[ "$have" == "$SETTINGS" ]] \
      || die "$DEST was prepared with '$have', not '$SETTINGS': set FORCE=1 to redo it, or another DEST"
    if why=$(textprep inputs-changed "$DEST/INPUTS.json" "${INPUTS[@]}"); then
      die "$DEST was prepared from other inputs ($why): set FORCE=1 to redo it, or another DEST"
    fi
    log "$DEST is already prepared (FORCE=1 to redo)"
    exit 0
  fi
  if [[ -f "$MARKERS/settings" && "$(cat "$MARKERS/settings")" != "$SETTINGS" ]]; then
    log "settings changed since the last run ($(cat "$MARKERS/settings") -> $SETTINGS): starting over"
    rm -rf "$MARKERS"
  fi
  if why=$(textprep inputs-changed "$MARKERS/inputs.json" "${INPUTS[@]}"); then
    log "inputs changed since the last run ($why): starting over"
    rm -rf "$MARKERS"
  fi
  mkdir -p "$TMP" "$MARKERS"
  printf '%s\n' "$SETTINGS" >"$MARKERS/settings"
  record_inputs
}

# record_inputs: (again) after downloads, so that the fingerprint has their sizes.
record_inputs() { textprep inputs-record "$MARKERS/inputs.json" "${INPUTS[@]}"; }

# remove_stale_tmp DEST: remove DEST.tmp.<pid> folders whose process is gone (a
# binarisation killed before it could clean up); a running one is left alone.
remove_stale_tmp() {
  local d pid
  for d in "$1".tmp.*; do
    [[ -d "$d" ]] || continue
    pid=${d##*.tmp.}
    if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
      log "leaving $d alone: process $pid is still running"
      continue
    fi
    log "removing $d, left by an interrupted run"
    rm -rf "$d"
  done
}

# recipe_tools: what every data recipe needs, checked before any work starts.
recipe_tools() {
  require_python_module sacremoses
  require_cmd fairseq-preprocess "run scripts/install.sh"
  case "${BPE:-subword-nmt}" in
    subword-nmt) require_cmd subword-nmt "pip install subword-nmt (scripts/install.sh does)" ;;
    sentencepiece) require_python_module sentencepiece ;;
    *) die "BPE=$BPE: expected subword-nmt or sentencepiece" ;;
  esac
}

# learn_bpe OUT_MODEL_PREFIX TRAIN_FILES...: joint subwords on the given files.
# subword-nmt: OUT.code (BPE_TOKENS merges); sentencepiece: OUT.model (BPE_TOKENS pieces).
learn_bpe() {
  local out=$1
  shift
  case "$BPE" in
    subword-nmt)
      cat "$@" | subword-nmt learn-bpe -s "$BPE_TOKENS" >"$out.code.tmp"
      mv "$out.code.tmp" "$out.code"
      ;;
    sentencepiece)
      textprep spm-train --input "$@" --prefix "$out.tmp" --vocab-size "$BPE_TOKENS" --threads "$WORKERS"
      mv "$out.tmp.model" "$out.model"
      mv "$out.tmp.vocab" "$out.vocab"
      ;;
  esac
}

# apply_bpe MODEL_PREFIX IN OUT
apply_bpe() {
  case "$BPE" in
    subword-nmt) subword-nmt apply-bpe -c "$1.code" --num-workers "$WORKERS" <"$2" >"$3.tmp" ;;
    sentencepiece) textprep spm-encode --model "$1.model" --workers "$WORKERS" <"$2" >"$3.tmp" ;;
  esac
  mv "$3.tmp" "$3"
}

# subword_splits: learn joint subwords on $TMP/train.{SRC,TGT} and apply them to
# $TMP/{train,valid,test}.{SRC,TGT}, writing $WORK/{train,valid,test}.{SRC,TGT}, and keep
# the tokenised test set as $WORK/test.tok.*; line counts checked.
subword_splits() {
  log "learning $BPE ($BPE_TOKENS) on train.$SRC + train.$TGT"
  learn_bpe "$WORK/bpe" "$TMP/train.$SRC" "$TMP/train.$TGT"
  local s l
  for s in train valid test; do
    for l in $SRC $TGT; do
      apply_bpe "$WORK/bpe" "$TMP/$s.$l" "$WORK/$s.$l"
    done
    same_lines "$WORK/$s.$SRC" "$WORK/$s.$TGT"
  done
  for l in $SRC $TGT; do
    cp "$TMP/test.$l" "$WORK/test.tok.$l"
  done
}

# binarize TEXT_DIR SRC TGT DEST [extra fairseq-preprocess args]: joined dictionary;
# written to a temporary folder and renamed, so DEST exists only when complete.
binarize() {
  local text=$1 src=$2 tgt=$3 dest=$4
  shift 4
  local tmp="$dest.tmp.$$"
  rm -rf "$tmp"
  mkdir -p "$(dirname "$dest")"
  # an interrupt (Ctrl-C, kill) removes the half-written folder; SIGKILL cannot be
  # caught: the next run removes what it leaves (remove_stale_tmp)
  # shellcheck disable=SC2064  # expand $tmp now
  trap "rm -rf '$tmp'; exit 130" INT TERM HUP
  fairseq-preprocess --source-lang "$src" --target-lang "$tgt" \
    --trainpref "$text/train" --validpref "$text/valid" --testpref "$text/test" \
    --destdir "$tmp" --joined-dictionary --workers "$WORKERS" "$@" >&2 \
    || { rm -rf "$tmp"; die "fairseq-preprocess failed for $text"; }
  # what evaluation and interactive use need besides the binaries
  local f
  for f in "$text"/bpe.* "$text"/test.raw.* "$text"/test.tok.*; do
    [[ -e "$f" ]] && cp "$f" "$tmp/"
  done
  [[ ! -f "$MARKERS/inputs.json" ]] || cp "$MARKERS/inputs.json" "$tmp/INPUTS.json"
  printf 'bpe=%s\nbpe_tokens=%s\nsource=%s\ntarget=%s\nsettings=%s\nreference=%s\ncreated=%s\n' "$BPE" \
    "$BPE_TOKENS" "$src" "$tgt" "$SETTINGS" "${SACREBLEU_REF:-test.raw.$tgt}" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    >"$tmp/PREPARED"
  rm -rf "$dest"
  mv "$tmp" "$dest"
  trap - INT TERM HUP
  log "wrote $dest"
}
