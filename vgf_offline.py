# Value Gradient Flow (VGF) for offline RL: D4RL and OGBench, one file.
# Paper: "Reinforcement Learning via Value Gradient Flow", Xu, Hu, Sojoudi, Zhang (ICLR 2026), arXiv 2604.14265.
# Particles drawn from a flow-matching behaviour policy mu are moved along grad_a Q by SVGD (a discretised
# Wasserstein gradient flow toward pi* ∝ mu · exp(Q / alpha)); the transport budget (steps x step size) is the only
# regulariser. L_test transport steps at test time trade compute for quality; L_test = 0 is best-of-N from mu.
import json
import math
import os
import random
import re
import sys
import tempfile
import time
import urllib.request
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import asdict, dataclass, field, fields
from typing import Annotated, Callable, Dict, List, Literal, Optional

import gymnasium as gym
import mujoco
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

CHECKPOINT_FORMAT = "vgf_offline/1"


def shown_default(text: str):
    """--help shows this default instead of `None` (options filled per task from SUITE_DEFAULTS / task_defaults)."""
    return tyro.conf.arg(help_behavior_hint=f"(default: {text})")


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    env_id: str = "halfcheetah-medium-v2"
    """D4RL id (hopper-medium-replay-v2, pen-cloned-v1) or OGBench singletask id (cube-double-play-singletask-v0)"""
    seed: int = 1
    """seed of the experiment (0 to 2**32 - 1)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda is used when available"""
    track: bool = False
    """if toggled, the run is tracked with Weights and Biases (tensorboard is always written)"""
    wandb_project_name: str = "vgf"
    """the wandb project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of the wandb project"""
    output_dir: str = "runs"
    """runs are written to <output-dir>/<run-name>/ (tensorboard events, eval.jsonl, checkpoint.pt)"""
    run_name: Annotated[Optional[str], shown_default("<env-id>__<exp-name>__<seed>__<unix time>")] = None
    """name of the run folder (a folder that already holds a run is refused)"""
    dataset_dir: Annotated[Optional[str], shown_default("$D4RL_DATASET_DIR or ~/.d4rl/datasets (D4RL), "
                                                        "~/.ogbench/data (OGBench)")] = None
    """where datasets are read from / downloaded to"""
    save_model: bool = False
    """save <run>/checkpoint.pt (networks, optimisers, RNG states) at every evaluation and at the end"""
    resume: Optional[str] = None
    """path of a checkpoint to continue training from (options not given on the command line are taken from it)"""
    eval_only: bool = False
    """only evaluate the checkpoint given by --checkpoint, for every --eval-transport-steps"""
    checkpoint: Optional[str] = None
    """checkpoint to evaluate with --eval-only"""

    # Algorithm specific arguments (None = the per-suite default of SUITE_DEFAULTS)
    total_steps: Annotated[Optional[int], shown_default(
        "1M (D4RL, OGBench); 2M OGBench antmaze-large, 3M antmaze-giant; 500k D4RL with --online-steps; 1M with "
        "--amortised --online-steps")] = None
    """number of (offline) gradient steps"""
    batch_size: int = 256
    """transitions per gradient step"""
    learning_rate: float = 3e-4
    """Adam learning rate of the critic and of the behaviour flow"""
    hidden_dims: List[int] = field(default_factory=lambda: [512, 512, 512, 512])
    """hidden layer sizes of the critic and of the behaviour flow"""
    discount: Annotated[Optional[float], shown_default(
        "0.99 (D4RL, OGBench manipulation, OGBench antmaze-giant); 0.995 (other OGBench navigation, and "
        "antmaze-giant with --amortised --online-steps)")] = None
    """discount factor gamma"""
    tau: float = 0.005
    """Polyak rate of the target critic"""
    num_particles: Annotated[Optional[int], shown_default("10; 5 with --amortised")] = None
    """N, particles (candidate actions) drawn from the reference policy per state"""
    bc_flow_steps: int = 10
    """K, Euler steps of the flow-matching reference sampler"""
    train_transport_steps: Annotated[Optional[int], shown_default(
        "5 (D4RL), 3 (OGBench); OGBench with --online-steps 5, with --amortised --online-steps antmaze 5, "
        "humanoidmaze 1, antsoccer 2, cube 1, scene 1, puzzle 5")] = None
    """L_train, SVGD steps applied to the particles of the TD target"""
    transport_step_size: Annotated[Optional[float], shown_default(
        "0.1 (D4RL), 0.05 (OGBench); OGBench with --online-steps 0.1, with --amortised --online-steps antmaze "
        "0.1, humanoidmaze 0.05, antsoccer 0.05, cube 0.05, scene 0.1, puzzle 0.1")] = None
    """eps, SVGD step size (the learning rate of the per-transport Adam)"""
    alpha: Annotated[Optional[float], shown_default(
        "0.1 (D4RL), 0.2 (OGBench); 1.0 OGBench with --online-steps (not --amortised)")] = None
    """temperature of the Boltzmann target pi* ∝ mu exp(Q/alpha); the score is grad Q / alpha"""
    target_q_agg: Annotated[Optional[Literal["min", "mean"]], shown_default(
        "min (D4RL, OGBench antmaze), mean (other OGBench)")] = None
    """aggregation of the two critics in the TD target and for action selection"""
    amortised: bool = False
    """amortised VGF: a network f(s, a) trained to match grad_a Q at dataset actions drives the transport (no kernel)"""
    fixed_bandwidth: bool = False
    """textbook SVGD: hold the median bandwidth fixed in the repulsion (the official code differentiates through it)"""
    action_selection: Literal["max", "softmax", "random"] = "max"
    """how the acting particle is picked among the N transported ones"""
    eval_every: Annotated[Optional[int], shown_default("50k (D4RL), 100k (OGBench)")] = None
    """evaluate every this many gradient steps (and at the end); 0 = only at the end"""
    eval_episodes: Annotated[Optional[int], shown_default("50")] = None
    """episodes per evaluation and per L_test, run as one batch of environments"""
    eval_transport_steps: List[int] = field(default_factory=lambda: [0, 1, 2, 3])
    """L_test values evaluated at every evaluation, each once (0 = best-of-N from the reference policy)"""
    log_every: int = 1000
    """write losses to tensorboard (and the progress bar) at the first step and every this many steps"""
    online_steps: int = 0
    """offline-to-online: environment steps of online fine-tuning after the offline steps (one update per step)"""
    online_warmup: int = 5000
    """online steps collected (acting with best-of-N, L = 0) before the updates resume"""
    reward_scale_episodes: Literal["official", "true"] = "official"
    """episodes of the D4RL reward scale 1000 / (max - min return): official code's 1000-row windows, or true ones"""

    # Speed options: each keeps results equal up to float32 rounding (tests/test_offline_speed.py), except
    # --cpu-bf16-matmul, which is reduced precision; --tf32 is the GPU default of JAX as well
    compile: bool = True
    """torch.compile the whole update as one graph (about a minute to compile; the eager update if it fails)"""
    cudagraphs: bool = False
    """on CUDA, capture the whole update (compiled or not) once as a CUDA graph and replay it: one launch per update"""
    tf32: bool = True
    """allow TF32 matrix multiplies on CUDA (JAX's default precision on GPUs)"""
    cpu_bf16_matmul: bool = False
    """REDUCED PRECISION: CPU matmuls in oneDNN's bf16 mode (Intel Xeon: 2.3e-3 error; AMD EPYC: exact, no speed-up)"""
    fused_adam: bool = True
    """fused Adam kernels in the eager update (--no-compile); with --compile Adam is part of the compiled graph"""
    threads: Annotated[Optional[int], shown_default("one per core")] = None
    """CPU threads of PyTorch (1 is fastest when other programs keep the cores busy)"""


# Per-suite defaults from the released run scripts (run_scripts/*.sh of the official code); task_defaults adds their
# per-task and offline-to-online values. An explicit command-line value always wins. README: "Defaults".
SUITE_DEFAULTS = {
    #                   gamma  L_train  eps   alpha  q_agg   steps      eval_every  episodes
    "d4rl-locomotion": (0.99, 5, 0.1, 0.1, "min", 1_000_000, 50_000, 50),
    "d4rl-antmaze": (0.99, 5, 0.1, 0.1, "min", 1_000_000, 50_000, 50),
    "d4rl-adroit": (0.99, 5, 0.1, 0.1, "min", 1_000_000, 50_000, 50),
    "ogbench-navigation": (0.995, 3, 0.05, 0.2, "mean", 1_000_000, 100_000, 50),
    "ogbench-manipulation": (0.99, 3, 0.05, 0.2, "mean", 1_000_000, 100_000, 50),
}
SUITE_FIELDS = ("discount", "train_transport_steps", "transport_step_size", "alpha", "target_q_agg", "total_steps",
                "eval_every", "eval_episodes")
AMORTISED_ONLINE_OGBENCH = {  # run_a_vgf_off2on_ogbench.sh: environment -> (L_train, eps)
    "antmaze": (5, 0.1), "humanoidmaze": (1, 0.05), "antsoccer": (2, 0.05), "cube": (1, 0.05), "scene": (1, 0.1),
    "puzzle": (5, 0.1)}


class VGFError(Exception):
    """A problem with the user's input or files, reported without a traceback."""


# ---------------------------------------------------------------------------------------------------------------------
# Datasets and environments
# ---------------------------------------------------------------------------------------------------------------------
D4RL_LOCOMOTION = {  # env -> (gymnasium id, extra kwargs, D4RL random score, D4RL expert score)
    "halfcheetah": ("HalfCheetah-v4", {}, -280.178953, 12135.0),
    "hopper": ("Hopper-v4", {}, -20.272305, 3234.3),
    "walker2d": ("Walker2d-v4", {}, 1.629008, 4592.3),
    "ant": ("Ant-v4", {"use_contact_forces": True}, -325.6, 3879.7),  # 111-dim observation, as D4RL's ant
}
D4RL_LOCOMOTION_DATASETS = ("random", "medium", "expert", "medium-replay", "medium-expert", "full-replay")
D4RL_ANTMAZE_FILES = {  # antmaze-<name>-v2 -> (maze file name, multistart, multigoal)
    "umaze": ("u-maze", False, False), "umaze-diverse": ("u-maze", True, True),
    "medium-play": ("big-maze", True, False), "medium-diverse": ("big-maze", True, True),
    "large-play": ("hardest-maze", True, False), "large-diverse": ("hardest-maze", True, True)}
D4RL_ADROIT_SCORES = {"pen": (96.262799, 3076.8331017826877), "door": (-56.512833, 2880.5693087298737),
                      "hammer": (-274.856578, 12794.134825156867), "relocate": (-6.425911, 4233.877797728884)}
D4RL_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl"
OGBENCH_NAVIGATION = ("antmaze-medium-navigate", "antmaze-large-navigate", "antmaze-giant-navigate",
                      "antmaze-teleport-navigate", "humanoidmaze-medium-navigate", "humanoidmaze-large-navigate",
                      "humanoidmaze-giant-navigate", "antsoccer-arena-navigate", "antsoccer-medium-navigate",
                      "pointmaze-medium-navigate", "pointmaze-large-navigate", "pointmaze-giant-navigate")
OGBENCH_MANIPULATION = ("cube-single-play", "cube-double-play", "cube-triple-play", "cube-quadruple-play",
                        "scene-play", "puzzle-3x3-play", "puzzle-4x4-play", "puzzle-4x5-play", "puzzle-4x6-play")


def supported_env_ids() -> str:
    return (f"D4RL: {{{','.join(D4RL_LOCOMOTION)}}}-{{{','.join(D4RL_LOCOMOTION_DATASETS)}}}-v2\n  "
            f"D4RL: antmaze-{{{','.join(D4RL_ANTMAZE_FILES)}}}-v2\n  "
            f"D4RL: {{{','.join(D4RL_ADROIT_SCORES)}}}-{{human,cloned,expert}}-v1\n  "
            f"OGBench: <env>-singletask-v0 or <env>-singletask-task{{1..5}}-v0 with <env> one of\n      "
            + "\n      ".join(OGBENCH_NAVIGATION + OGBENCH_MANIPULATION))


def parse_env_id(env_id: str) -> Dict:
    """Suite, dataset and evaluation facts of an env id; raises VGFError listing the supported ids."""
    m = re.fullmatch(r"(halfcheetah|hopper|walker2d|ant)-(" + "|".join(D4RL_LOCOMOTION_DATASETS) + r")-v2", env_id)
    if m:
        env, dataset = m.groups()
        gym_id, kwargs, random_score, expert_score = D4RL_LOCOMOTION[env]
        file_name = f"{env}_{dataset.replace('-', '_')}-v2.hdf5"
        return dict(suite="d4rl-locomotion", file_name=file_name, url=f"{D4RL_URL}/gym_mujoco_v2/{file_name}",
                    gym_id=gym_id, gym_kwargs=kwargs, ref_scores=(random_score, expert_score))
    m = re.fullmatch(r"antmaze-(" + "|".join(D4RL_ANTMAZE_FILES) + r")-v2", env_id)
    if m:
        maze, multistart, multigoal = D4RL_ANTMAZE_FILES[m.group(1)]
        file_name = f"Ant_maze_{maze}_noisy_multistart_{multistart}_multigoal_{multigoal}_sparse_fixed.hdf5"
        return dict(suite="d4rl-antmaze", file_name=file_name, url=f"{D4RL_URL}/ant_maze_v2/{file_name}",
                    ref_scores=(0.0, 1.0))
    m = re.fullmatch(r"(pen|door|hammer|relocate)-(human|cloned|expert)-v1", env_id)
    if m:
        return dict(suite="d4rl-adroit", file_name=f"{env_id}.hdf5", url=f"{D4RL_URL}/hand_dapg_v1/{env_id}.hdf5",
                    ref_scores=D4RL_ADROIT_SCORES[m.group(1)])
    m = re.fullmatch(r"(.+)-singletask(-task[1-5])?-v0", env_id)
    if m and m.group(1) in OGBENCH_NAVIGATION + OGBENCH_MANIPULATION:
        suite = "ogbench-navigation" if m.group(1) in OGBENCH_NAVIGATION else "ogbench-manipulation"
        return dict(suite=suite, dataset_name=f"{m.group(1)}-v0")
    raise VGFError(f"unknown --env-id '{env_id}'. Supported ids:\n  " + supported_env_ids())


def task_defaults(args: Args) -> Dict:
    """Default values for args.env_id: the suite's row, then the run scripts' per-task and offline-to-online values."""
    suite, name = parse_env_id(args.env_id)["suite"], args.env_id
    d = dict(zip(SUITE_FIELDS, SUITE_DEFAULTS[suite]), num_particles=5 if args.amortised else 10)
    if suite == "ogbench-navigation" and name.startswith("antmaze"):  # run_vgf_off_ogbench.sh
        d["target_q_agg"] = "min"
        if name.startswith("antmaze-large"):
            d["total_steps"] = 2_000_000
        if name.startswith("antmaze-giant"):
            d.update(total_steps=3_000_000, discount=0.99)
    if args.online_steps > 0 and not args.amortised:  # run_vgf_off2on_{d4rl,ogbench}.sh
        if suite.startswith("d4rl"):
            d["total_steps"] = 500_000
        else:
            d.update(train_transport_steps=5, transport_step_size=0.1, alpha=1.0)
    elif args.online_steps > 0 and suite.startswith("ogbench"):  # run_a_vgf_off2on_ogbench.sh
        steps, eps = AMORTISED_ONLINE_OGBENCH.get(name.split("-")[0], (d["train_transport_steps"],
                                                                        d["transport_step_size"]))
        d.update(train_transport_steps=steps, transport_step_size=eps, total_steps=1_000_000)
        if name.startswith("antmaze-giant"):
            d["discount"] = 0.995
    return d


def resolve_suite_defaults(args: Args) -> Args:
    """Fill the None fields of args from task_defaults."""
    for name, value in task_defaults(args).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def validate(args: Args):
    """Reject out-of-range options before anything is built or written (exit 2 with every problem named)."""
    rules = [  # (field, valid, range); comparisons are written so that NaN fails them
        ("total_steps", args.total_steps >= 1, ">= 1"),
        ("batch_size", args.batch_size >= 1, ">= 1"),
        ("learning_rate", 0 < args.learning_rate < math.inf, "> 0"),
        ("hidden_dims", len(args.hidden_dims) >= 1 and min(args.hidden_dims) >= 1, "one or more sizes >= 1"),
        ("discount", 0 <= args.discount <= 1, "in [0, 1]"),
        ("tau", 0 < args.tau <= 1, "in (0, 1]"),
        ("num_particles", args.num_particles >= 1, ">= 1"),
        ("bc_flow_steps", args.bc_flow_steps >= 1, ">= 1"),
        ("train_transport_steps", args.train_transport_steps >= 0, ">= 0"),
        ("transport_step_size", 0 < args.transport_step_size < math.inf, "> 0"),
        ("alpha", 0 < args.alpha < math.inf, "> 0"),
        ("eval_every", args.eval_every >= 0, ">= 0 (0: evaluate only at the end)"),
        ("eval_episodes", args.eval_episodes >= 1, ">= 1"),
        ("eval_transport_steps", len(args.eval_transport_steps) >= 1 and min(args.eval_transport_steps) >= 0,
         "one or more values >= 0"),
        ("eval_transport_steps", len(set(args.eval_transport_steps)) == len(args.eval_transport_steps),
         "distinct values (each L_test once)"),
        ("seed", 0 <= args.seed < 2**32, "in [0, 2**32 - 1]"),
        ("log_every", args.log_every >= 1, ">= 1"),
        ("online_steps", args.online_steps >= 0, ">= 0"),
        ("online_warmup", args.online_warmup >= 0, ">= 0"),
        ("threads", args.threads is None or args.threads >= 1, ">= 1"),
    ]
    bad = []
    for name, valid, valid_range in rules:
        if not valid:
            value = getattr(args, name)
            shown = (" ".join(map(str, value)) or "(empty)") if isinstance(value, list) else value
            bad.append(f"--{name.replace('_', '-')} {shown} is out of range: must be {valid_range}")
    if bad:
        raise VGFError("\n  ".join(bad))


def given_options(argv: List[str]) -> set:
    """The Args fields named on the command line (`--env-id X`, `--env-id=X`, `--no-compile`), even when the value
    given equals the default: those win over a checkpoint's values."""
    known, names = {f.name for f in fields(Args)}, set()
    for word in argv:
        if word.startswith("--"):
            name = word[2:].split("=")[0].replace("-", "_")
            name = name[3:] if name not in known and name.startswith("no_") else name
            names |= {name} & known
    return names


def check_run_folder(run_dir: str, continues_step: Optional[int] = None):
    """Two runs never share a folder (their eval.jsonl and events would merge into one curve). --resume may continue
    in the checkpoint's own folder (continues_step: the checkpoint's step). The folder's nearest existing parent must
    be a writable folder."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise VGFError(f"the run folder {run_dir} is a file; pass another --run-name or --output-dir")
    if os.path.isdir(run_dir) and os.listdir(run_dir):
        if continues_step is None:
            raise VGFError(f"{run_dir} already holds a run; pass another --run-name (or --output-dir), or delete it "
                           f"(--resume PATH continues a run in its own folder)")
        read_evaluations(run_dir)
    folder = os.path.abspath(run_dir)
    while not os.path.isdir(folder):
        if os.path.exists(folder):
            raise VGFError(f"--output-dir: {folder} is a file, not a folder; pass a folder")
        folder = os.path.dirname(folder)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise VGFError(f"--output-dir: cannot write into {folder} (permission denied); pass a writable --output-dir")


def read_evaluations(run_dir: str) -> List[Dict]:
    """The rows of run_dir/eval.jsonl (none if it does not exist yet), each checked to name its update step."""
    eval_path = os.path.join(run_dir, "eval.jsonl")
    if not os.path.isfile(eval_path):
        return []
    try:
        with open(eval_path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        for row in rows:
            int(row["step"])
    except (ValueError, KeyError, TypeError):
        raise VGFError(f"{eval_path} is not a list of evaluations; pass --run-name NEW to continue in a new "
                       "folder") from None
    return rows


def drop_evaluations_past(run_dir: str, step: int):
    """A run stopped between an evaluation and its checkpoint (e.g. a preempted job) resumes from the previous
    checkpoint: the evaluations of the lost updates are dropped and repeated, so the curve has no duplicates."""
    rows = read_evaluations(run_dir)
    kept = [row for row in rows if row["step"] <= step]
    if len(kept) < len(rows):
        with open(os.path.join(run_dir, "eval.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in kept)
        print(f"note: dropped {len(rows) - len(kept)} evaluation rows past the checkpoint's step {step} from "
              f"{run_dir}/eval.jsonl (they are repeated as training continues)")


def download(url: str, path: str, where_hint: str):
    """Download url to path with a progress bar. A partial file never remains under the final name, and a folder is
    created only once the server answers (and removed again if the download still fails)."""
    from tqdm import tqdm

    tmp, created = path + ".part", []
    target = folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder):  # the folders a download would create, innermost first
        created.append(folder)
        folder = os.path.dirname(folder)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            os.makedirs(target, exist_ok=True)
            total = int(response.headers.get("Content-Length") or 0) or None
            with open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(path)) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except BaseException as e:  # URLError, timeouts and HTTP errors are OSErrors; Ctrl-C cleans up too
        if os.path.exists(tmp):
            os.remove(tmp)
        for folder in created:
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)
        if not isinstance(e, (OSError, ValueError)):
            raise
        raise VGFError(f"dataset file {path} is missing and downloading it from {url} failed ({e}).\n"
                       f"Download it on a machine with network access and copy it to {path} "
                       f"(or point {where_hint} at the folder that holds it).") from None
    os.replace(tmp, path)


def must_download(path: str) -> bool:
    """True when the dataset file does not exist. A file that exists but cannot be read (or sits in a folder that
    cannot be entered) is an error, never a reason to download it again."""
    try:
        with open(path, "rb"):
            return False
    except FileNotFoundError:
        return True
    except PermissionError:
        raise VGFError(f"dataset file {path} cannot be read (permission denied on the file or a folder above it); "
                       "fix the permissions or pass another --dataset-dir") from None
    except OSError as e:
        raise VGFError(f"dataset file {path} cannot be read ({e.strerror or e}); pass another --dataset-dir") from None


def check_binary(arrays: Dict[str, np.ndarray], path: str):
    """terminals / timeouts must be 0 or 1: a fractional flag would silently become 'true' (every row an end)."""
    for key, value in arrays.items():
        bad = ~np.isin(value, (0, 1))
        if bad.any():
            row = np.flatnonzero(bad)[0]
            raise VGFError(f"{path}: key '{key}' must hold 0 or 1 (booleans), but row {row} holds {value[row]} "
                           f"({bad.sum()} row(s) in all); repair the file")


def check_action_range(actions: np.ndarray, path: str, tolerance: float = 1e-3):
    """The policy acts in [-1, 1] and dataset actions are clipped to it (official code). Actions outside are clipped
    with a warning; a dataset in other units (more than 1 % of the entries beyond +-1.5) is refused."""
    outside = np.abs(actions) > 1 + tolerance
    if outside.any():
        share, largest = 100.0 * outside.mean(), float(np.abs(actions).max())
        if (np.abs(actions) > 1.5).mean() > 0.01:
            raise VGFError(f"{path}: {share:.1f} % of the action entries lie outside [-1, 1] (largest |a| "
                           f"{largest:.3g}); the policy acts in [-1, 1]: rescale the actions to it")
        print(f"warning: {path}: {share:.3f} % of the action entries lie outside [-1, 1] (largest |a| {largest:.3g}); "
              "they are clipped to [-1, 1]")


def check_finite(arrays: Dict[str, np.ndarray], path: str):
    """A NaN or inf in the data would only surface much later as a non-finite loss: name the key and the first row."""
    for key, value in arrays.items():
        if np.issubdtype(value.dtype, np.floating):
            bad = ~np.isfinite(value.reshape(len(value), -1)).all(1)
            if bad.any():
                raise VGFError(f"{path}: key '{key}' holds NaN or inf at row {np.flatnonzero(bad)[0]} ({bad.sum()} "
                               f"row(s) in all); repair the file or delete it to download it again")


def read_d4rl_hdf5(path: str) -> Dict[str, np.ndarray]:
    """Read the keys of a D4RL HDF5 file that VGF needs, checking names and shapes."""
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise VGFError(f"{path} is not a readable HDF5 file ({e}); delete it to download it again.") from None
    with f:
        missing = [k for k in ("observations", "actions", "rewards", "terminals") if k not in f]
        if missing:
            raise VGFError(f"{path} is not a D4RL dataset: missing key(s) {missing} (found {sorted(f.keys())})")
        data = {k: f[k][()] for k in ("observations", "actions", "rewards", "terminals", "timeouts") if k in f}
    n = len(data["observations"])
    for k, v in data.items():
        if len(v) != n or (k in ("rewards", "terminals", "timeouts") and v.ndim != 1) or \
                (k in ("observations", "actions") and v.ndim != 2):
            raise VGFError(f"{path}: key '{k}' has shape {v.shape}; expected {n} rows like 'observations' "
                           f"{data['observations'].shape}, 1-D for rewards/terminals/timeouts and 2-D otherwise")
    check_finite(data, path)
    check_binary({k: data[k] for k in ("terminals", "timeouts") if k in data}, path)
    check_action_range(data["actions"], path)
    return data


def qlearning_transitions(data: Dict[str, np.ndarray], max_episode_steps: int = 1000) -> Dict[str, np.ndarray]:
    """(s, a, r, s', done) as d4rl.qlearning_dataset builds them: s' = observations[i+1], and the last step of an
    episode cut by a time limit (timeouts) is dropped, because its s' belongs to the next episode."""
    n = len(data["observations"])
    if "timeouts" in data:
        timeouts = data["timeouts"].astype(bool)
    else:  # old files: episodes are cut every max_episode_steps, counted as d4rl does (1 after a terminal row)
        timeouts = np.zeros(n, bool)
        step = 0
        for i in range(n):
            timeouts[i] = step == max_episode_steps - 1
            step = 0 if timeouts[i] else 1 if data["terminals"][i] else step + 1
    keep = np.flatnonzero(~timeouts[:-1])
    return dict(observations=data["observations"][keep].astype(np.float32),
                actions=data["actions"][keep].astype(np.float32),
                rewards=data["rewards"][keep].astype(np.float32),
                next_observations=data["observations"][keep + 1].astype(np.float32),
                terminals=data["terminals"][keep].astype(np.float32))


def official_window_ends(terminals: np.ndarray, window: int = 1000) -> np.ndarray:
    """Ends of the official code's 'episodes' for the reward scale: a row of the timeout-stripped transitions ends one
    if it is a terminal or the window-th row since the last end (so time-limited episodes run together)."""
    terminals = terminals.astype(bool)
    rows = np.arange(len(terminals))
    start = np.maximum.accumulate(np.where(np.r_[True, terminals[:-1]], rows, 0))  # first row after the last terminal
    return terminals | ((rows - start + 1) % window == 0)


def episode_return_range(rewards: np.ndarray, episode_ends: np.ndarray):
    """Min and max return over the complete episodes (rows up to each end); a trailing incomplete one is ignored."""
    ends = np.flatnonzero(episode_ends)
    if len(ends) == 0:
        raise VGFError("the dataset holds no complete episode; cannot scale rewards")
    returns = np.add.reduceat(rewards[: ends[-1] + 1].astype(np.float64), np.r_[0, ends[:-1] + 1])
    return float(returns.min()), float(returns.max()), len(returns)


def ogbench_env_kwargs() -> Dict:
    """ogbench >= 1.2 computes singletask success, reward and termination before the step; the official code pins
    1.1.0, which computes them after it: ask for that. The datasets' relabelled rewards and masks (from the state s of
    each (s, a, s') transition) are the same in both versions."""
    from importlib.metadata import version

    major, minor = (int(x) for x in version("ogbench").split(".")[:2])
    return {"success_timing": "post"} if (major, minor) >= (1, 2) else {}


def load_dataset(args: Args):
    """Transitions (observations, actions, rewards, next_observations, masks) with the official preprocessing, and the
    reward transform r -> r * scale + shift that was applied (online transitions get the same)."""
    spec = parse_env_id(args.env_id)
    reward_scale, reward_shift = 1.0, 0.0
    if spec["suite"].startswith("d4rl"):
        folder = args.dataset_dir or os.environ.get("D4RL_DATASET_DIR") or os.path.expanduser("~/.d4rl/datasets")
        path = os.path.join(folder, spec["file_name"])
        if must_download(path):
            print(f"downloading {spec['url']} -> {path}")
            download(spec["url"], path, "--dataset-dir / $D4RL_DATASET_DIR")
        raw = read_d4rl_hdf5(path)
        data = qlearning_transitions(raw)
        if spec["suite"] == "d4rl-antmaze":  # sparse 0/1 reward shifted to -1/0, as the official code
            reward_shift = -1.0
        else:  # rewards scaled by 1000 / (max return - min return)
            if args.reward_scale_episodes == "official":
                ends = official_window_ends(data["terminals"])
                if not ends.any():
                    raise VGFError(f"{path}: no terminal and fewer than 1000 transitions, so the official reward scale "
                                   "is undefined; use --reward-scale-episodes true (the dataset's episodes)")
                low, high, count = episode_return_range(data["rewards"], ends)
                what = "windows cut at terminals or every 1000 transitions (official; --reward-scale-episodes true: " \
                       "true episodes)"
            else:
                low, high, count = episode_return_range(raw["rewards"], raw["terminals"] | raw.get("timeouts", False))
                what = "true episodes (--reward-scale-episodes true)"
            if not high - low > 1e-6:
                raise VGFError(f"{path}: all {count} {what.split(' (')[0]} have the same return {low:.4g}, so the "
                               "reward scale 1000 / (max - min return) is undefined; try the other "
                               "--reward-scale-episodes")
            reward_scale = 1000.0 / (high - low)
            print(f"returns in [{low:.1f}, {high:.1f}] over {count} {what}; rewards scaled by {reward_scale:.4f}")
        data["rewards"] = (data["rewards"] * reward_scale + reward_shift).astype(np.float32)
        data["masks"] = 1.0 - data.pop("terminals")  # bootstrap unless a true terminal
    else:
        import ogbench

        folder = os.path.expanduser(args.dataset_dir or "~/.ogbench/data")
        for name in (spec["dataset_name"], spec["dataset_name"] + "-val"):
            path = os.path.join(folder, name + ".npz")
            if must_download(path):
                print(f"downloading {ogbench.utils.DATASET_URL}/{name}.npz -> {path}")
                download(f"{ogbench.utils.DATASET_URL}/{name}.npz", path, "--dataset-dir")
        path = os.path.join(folder, spec["dataset_name"] + ".npz")
        try:
            with np.load(path) as raw:  # one key at a time; qpos gives the relabelled rewards
                for key in set(raw.files) & {"observations", "actions", "qpos", "qvel"}:
                    check_finite({key: raw[key]}, path)
                if "actions" in raw.files:
                    check_action_range(raw["actions"], path)
            _, train, _ = ogbench.make_env_and_datasets(args.env_id, dataset_dir=folder, **ogbench_env_kwargs())
        except (KeyError, ValueError, OSError, zipfile.BadZipFile) as e:
            raise VGFError(f"could not read the OGBench dataset {spec['dataset_name']} in {folder}: {e!r}. The npz "
                           f"must hold observations, actions, terminals, qpos, qvel (+ button_states).") from None
        data = {k: train[k].astype(np.float32) for k in ("observations", "actions", "rewards", "next_observations",
                                                         "masks")}
    data["actions"] = np.clip(data["actions"], -1 + 1e-5, 1 - 1e-5)
    return data, reward_scale, reward_shift


# ---------------------------------------------------------------------------------------------------------------------
# D4RL AntMaze v2 and Adroit v1 without the `d4rl` package: thin adapters over gymnasium-robotics' AntMaze v5 and
# AdroitHand v1 that reproduce D4RL's observations, action mapping, goals, rewards, termination and horizons
# (checked by replaying dataset states in tests/test_d4rl_envs.py; differences are listed in the README).
# ---------------------------------------------------------------------------------------------------------------------
# The maps antmaze-*-v2 registers (D4RL maze_env.U_MAZE_TEST, BIG_MAZE_TEST, HARDEST_MAZE_TEST);
# '#' wall, 'r' start (origin of D4RL's frame), 'g' goal cell. Row i is D4RL's y = 4 (i - i_r).
ANTMAZE_MAPS = {
    "umaze": ["#####", "#r..#", "###.#", "#g..#", "#####"],
    "medium": ["########", "#r.##..#", "#..#...#", "##...###", "#..#...#", "#.#..#.#", "#...#.g#",
               "########"],
    "large": ["############", "#r...#.....#", "#.##.#.#.#.#", "#......#...#", "#.####.###.#",
              "#..#.#.....#", "##.#.#.#.###", "#..#...#.g.#", "############"]}
ANTMAZE_HORIZON = {"umaze": 700, "medium": 1000, "large": 1000}
GOAL_RADIUS = 0.5  # D4RL GoalReachingEnv: reward 1 and done when |xy - goal| <= 0.5 (gymnasium-robotics: 0.45)


def _d4rl_ant_xml():
    """gymnasium's ant.xml edited to D4RL's ant (d4rl/locomotion/assets/ant.xml); returns a temp path."""
    src = os.path.join(os.path.dirname(gym.__file__), "envs", "mujoco", "assets", "ant.xml")
    tree = ET.parse(src)
    tree.find("option").set("timestep", "0.02")  # D4RL: 0.02 (control step 0.1 s); gymnasium 0.01
    geom_default = tree.find("default/geom")
    geom_default.set("solref", ".02 1")
    geom_default.set("solimp", ".8 .8 .01")  # D4RL's contact softness; gymnasium uses MuJoCo's default
    for motor in tree.iter("motor"):  # D4RL: gear 1, torque range +-30; gymnasium: gear 150, +-1
        motor.set("gear", "1")
        motor.set("ctrlrange", "-30 30")
    fd, path = tempfile.mkstemp(suffix=".xml")
    os.close(fd)
    tree.write(path)
    return path


class D4RLAntMaze(gym.Wrapper):
    """D4RL antmaze-*-v2 (eval mode) on gymnasium-robotics' AntMaze. Observations, goals and states
    are in D4RL's frame; gymnasium-robotics' frame is D4RL's + `offset` once the map rows are reversed
    (it builds the y-mirror image of the same map)."""

    def __init__(self, maze):
        rows = ANTMAZE_MAPS[maze]
        gr_map = [[{"#": 1, ".": 0}.get(c, c) for c in row] for row in reversed(rows)]
        from gymnasium_robotics.envs.maze.ant_maze_v5 import AntMazeEnv

        xml = _d4rl_ant_xml()
        env = AntMazeEnv(maze_map=gr_map, xml_file=xml, continuing_task=True,
                         include_cfrc_ext_in_observation=False)
        os.remove(xml)
        os.remove(env.tmp_xml_file_path)
        super().__init__(env)
        cells = {c: [(i, j) for i, row in enumerate(rows) for j, ch in enumerate(row) if ch == c] for c in "rg"}
        (ri, rj), = cells["r"]
        self.goal_cells = [np.array([4.0 * (j - rj), 4.0 * (i - ri)]) for i, j in cells["g"]]
        self.offset = env.maze.cell_rowcol_to_xy(np.array([len(rows) - 1 - ri, rj]))  # D4RL origin in gr frame
        self.ant = env.ant_env
        self.model, self.data = self.ant.model, self.ant.data
        self.init_qpos = np.array([0, 0, 0.75, 1] + [0.0] * 11)  # D4RL frame, ant at the start cell
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (29,), np.float64)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (8,), np.float32)
        self.goal = self.goal_cells[0].copy()

    def _obs(self):
        qpos, qvel = self.data.qpos[:15].copy(), self.data.qvel[:14].copy()
        qpos[:2] -= self.offset
        return np.concatenate([qpos, qvel])

    def xy(self):
        return self.data.qpos[:2] - self.offset

    def _set_sim(self, qpos, qvel):
        """Simulator state (D4RL frame) -> observation."""
        qpos = np.array(qpos, dtype=np.float64)
        qpos[:2] += self.offset
        qpos[3:7] /= np.linalg.norm(qpos[3:7])  # as mj_forward did in D4RL (3.1.6 still does; newer may not)
        self.data.qpos[:], self.data.qvel[:] = qpos, np.asarray(qvel, np.float64)
        self.data.qacc_warmstart[:] = 0
        mujoco.mj_forward(self.model, self.data)
        return self._obs()

    def reset(self, *, seed=None, options=None):
        self.env.reset(seed=seed)  # seeds np_random, resets the simulator
        rng = self.env.unwrapped.np_random
        # D4RL maze_env.goal_sampler: goal cell + U(0, 1) + U(0, 0.5) per axis, clipped at 0
        cell = self.goal_cells[rng.integers(len(self.goal_cells))]
        self.goal = np.maximum(cell + rng.uniform(0, 1, 2) + rng.uniform(0, 0.5, 2), 0.0)
        if options and "goal" in options:  # D4RL set_target(goal)
            self.goal = np.array(options["goal"], dtype=np.float64)
        # D4RL AntEnv.reset_model: qpos noise U(-0.1, 0.1) on all 15 entries, qvel 0.1 N(0, 1)
        obs = self._set_sim(self.init_qpos + rng.uniform(-0.1, 0.1, 15), 0.1 * rng.standard_normal(14))
        self.model.site_pos[self.env.unwrapped.target_site_id, :2] = self.goal + self.offset  # rendering
        return obs, {"success": False, "goal": self.goal.copy()}

    def step(self, action):
        # D4RL NormalizedBoxEnv in float32: lb + (a + 1) * 0.5 * (ub - lb), clipped to [lb, ub]
        a = np.asarray(action, dtype=np.float32)
        lb, ub = np.float32(-30.0), np.float32(30.0)
        self.ant.do_simulation(np.clip(lb + (a + 1) * np.float32(0.5) * (ub - lb), lb, ub), self.ant.frame_skip)
        success = bool(np.linalg.norm(self.xy() - self.goal) <= GOAL_RADIUS)
        return self._obs(), float(success), success, False, {"success": success, "goal": self.goal.copy()}


def make_antmaze_env(env_id):
    """antmaze-{umaze,umaze-diverse,medium-*,large-*}-v2 -> D4RL-equivalent gymnasium env."""
    maze = env_id.split("-")[1]
    return gym.wrappers.TimeLimit(D4RLAntMaze(maze), max_episode_steps=ANTMAZE_HORIZON[maze])


ADROIT_HORIZON = {"pen": 100, "door": 200, "hammer": 200, "relocate": 200}


class D4RLAdroit(gym.Wrapper):
    """D4RL {pen,door,hammer,relocate}-v1: gymnasium-robotics' physics and observations (identical models),
    reward / done / goal_achieved recomputed with D4RL's formulas (gymnasium-robotics 1.2.1-1.4.2 flips the
    sign of the first distance term of door, hammer, relocate, and pen never terminates)."""

    def __init__(self, task):
        from gymnasium_robotics.envs import adroit_hand

        super().__init__(getattr(adroit_hand, f"AdroitHand{task.capitalize()}Env")())
        self.task = task
        self.model, self.data = self.env.unwrapped.model, self.env.unwrapped.data
        self.body = lambda name: mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_BODY, name)
        self.site = lambda name: mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_SITE, name)
        if task == "pen":  # D4RL measures the (rigid) pen lengths once at construction
            mujoco.mj_forward(self.model, self.data)
            u, sx = self.env.unwrapped, self.data.site_xpos
            u.pen_length = np.linalg.norm(sx[self.site("object_top")] - sx[self.site("object_bottom")])
            u.tar_length = np.linalg.norm(sx[self.site("target_top")] - sx[self.site("target_bottom")])

    def reward(self):
        """D4RL's (reward, done, goal_achieved) for the current simulator state."""
        d, sx, norm, task = self.data, self.data.site_xpos, np.linalg.norm, self.task
        if task == "pen":
            u = self.env.unwrapped
            obj, loc = d.xpos[self.body("Object")], sx[self.site("eps_ball")]
            obj_orien = (sx[self.site("object_top")] - sx[self.site("object_bottom")]) / u.pen_length
            tar_orien = (sx[self.site("target_top")] - sx[self.site("target_bottom")]) / u.tar_length
            dist, sim = norm(obj - loc), float(obj_orien @ tar_orien)
            r = -dist + sim + 10.0 * (dist < 0.075 and sim > 0.9) + 50.0 * (dist < 0.075 and sim > 0.95)
            dropped = bool(obj[2] < 0.075)  # pen fell: -5 and episode end
            return r - 5.0 * dropped, dropped, bool(dist < 0.075 and sim > 0.95)
        if task == "door":
            joint = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_JOINT, "door_hinge")
            hinge = d.qpos[self.model.jnt_dofadr[joint]]  # D4RL indexes qpos by the dof address (same here)
            r = -0.1 * norm(sx[self.site("S_grasp")] - sx[self.site("S_handle")]) - 0.1 * (hinge - 1.57) ** 2
            r += -1e-5 * np.sum(d.qvel ** 2) + 2.0 * (hinge > 0.2) + 8.0 * (hinge > 1.0) + 10.0 * (hinge > 1.35)
            return r, False, bool(hinge >= 1.35)
        if task == "hammer":
            obj, palm = d.xpos[self.body("Object")], sx[self.site("S_grasp")]
            tool, nail, goal = sx[self.site("tool")], sx[self.site("S_target")], sx[self.site("nail_goal")]
            nd = norm(nail - goal)
            r = -0.1 * norm(palm - obj) - norm(tool - nail) - 10.0 * nd - 1e-2 * norm(d.qvel)
            r += 2.0 * (obj[2] > 0.04 and tool[2] > 0.04) + 25.0 * (nd < 0.02) + 75.0 * (nd < 0.01)
            return r, False, bool(nd < 0.01)
        obj, palm, target = d.xpos[self.body("Object")], sx[self.site("S_grasp")], sx[self.site("target")]
        od = norm(obj - target)
        r = -0.1 * norm(palm - obj)
        if obj[2] > 0.04:  # object lifted
            r += 1.0 - 0.5 * norm(palm - target) - 0.5 * od
        return r + 10.0 * (od < 0.1) + 20.0 * (od < 0.05), False, bool(od < 0.1)

    def step(self, action):
        obs, *_ = self.env.step(np.asarray(action, dtype=np.float32))  # physics + observation only
        r, done, achieved = self.reward()
        return obs, float(r), done, False, {"success": achieved, "goal_achieved": achieved}


def make_adroit_env(env_id):
    """{pen,door,hammer,relocate}-{human,cloned,expert}-v1 -> D4RL-equivalent gymnasium env."""
    task = env_id.split("-")[0]
    return gym.wrappers.TimeLimit(D4RLAdroit(task), max_episode_steps=ADROIT_HORIZON[task])


def make_eval_env(env_id: str) -> gym.Env:
    spec = parse_env_id(env_id)
    if spec["suite"] == "d4rl-locomotion":
        return gym.make(spec["gym_id"], **spec["gym_kwargs"])
    if spec["suite"] == "d4rl-antmaze":
        return make_antmaze_env(env_id)
    if spec["suite"] == "d4rl-adroit":
        return make_adroit_env(env_id)
    import ogbench

    return ogbench.make_env_and_datasets(env_id, env_only=True, **ogbench_env_kwargs())


def episode_score(env_id: str, episode_return: float, success: float) -> float:
    """D4RL normalised score x100, or OGBench success rate in percent."""
    spec = parse_env_id(env_id)
    if "ref_scores" in spec:
        low, high = spec["ref_scores"]
        return 100.0 * (episode_return - low) / (high - low)
    return 100.0 * success


# ---------------------------------------------------------------------------------------------------------------------
# Networks: flow-matching reference policy mu and the critic ensemble
# ---------------------------------------------------------------------------------------------------------------------
def onednn_linear_op():
    """torch.ops.vgf_offline.linear(x, weight [out, in], bias) = x @ weight.T + bias through oneDNN's float32 matmul
    (strict float32 math, no down-conversion), registered once as an opaque op so that torch.compile calls it as
    is; None without oneDNN. It has no autograd: only the no-gradient paths (linear_nograd) use it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.vgf_offline.linear  # registered already
    except (AttributeError, RuntimeError):
        pass

    @torch.library.custom_op("vgf_offline::linear", mutates_args=())
    def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    @linear.register_fake
    def _(x, weight, bias):
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    try:  # a private oneDNN op: checked once against F.linear, F.linear is used where it is missing or differs
        gen = torch.Generator().manual_seed(0)  # not the global generator: importing must not change seeded runs
        x, w, b = torch.randn(3, 5, generator=gen), torch.randn(4, 5, generator=gen), torch.randn(4, generator=gen)
        if not torch.allclose(torch.ops.vgf_offline.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-6):
            return None
    except RuntimeError:
        return None
    return torch.ops.vgf_offline.linear


ONEDNN_LINEAR = onednn_linear_op()


def linear_nograd(x, weight, bias=None):
    """x @ weight.T + bias (weight [out, in]) where no gradient is taken (reference sampling, transport, TD target,
    acting): on CPU in float32 through oneDNN (exact float32 like the default MKL path, faster than it on the
    development machine: 94-102 vs 80-88 GFLOP/s on one core), F.linear otherwise. oneDNN wants plain weight
    layouts (a column slice is made contiguous first: a strided one takes a slow reference path)."""
    if ONEDNN_LINEAR is not None and x.device.type == "cpu" and x.dtype == torch.float32 and \
            not torch.is_grad_enabled():
        return ONEDNN_LINEAR(x, weight, bias)
    return F.linear(x, weight, bias)


def mlp(sizes: List[int]) -> nn.Sequential:
    layers = []
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        linear = nn.Linear(d_in, d_out)
        nn.init.xavier_uniform_(linear.weight)  # flax default_init: variance_scaling(1, fan_avg, uniform)
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.ReLU()] if i < len(sizes) - 2 else [linear]
    return nn.Sequential(*layers)


class BehaviourFlow(nn.Module):
    """Velocity field v(s, x_t, t) of the flow-matching behaviour policy (the reference distribution mu)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: List[int]):
        super().__init__()
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.net = mlp([obs_dim + act_dim + 1, *hidden_dims, act_dim])

    def forward(self, obs, x_t, t):
        return self.net(torch.cat([obs, x_t, t], -1))

    def obs_features(self, obs):
        """The observation part of the first layer, plus its bias: the same at every Euler step (computed once)."""
        first = self.net[0]
        return linear_nograd(obs, first.weight[:, :self.obs_dim].contiguous(), first.bias)

    def velocity(self, features, x_t, t: float, repeats: int):
        """v(s, x_t, t) from obs_features(s) [B, H] for `repeats` consecutive rows x_t [B * repeats, A] per state at
        a shared time t: the first layer split as W [s, x, t] = W_s s + W_x x + W_t t (forward's result up to float32
        rounding), so the observation part is not recomputed at each step and for each particle."""
        first, h = self.net[0], features.shape[-1]
        features = (features + t * first.weight[:, -1]).unsqueeze(1)  # [B, 1, H]
        x = linear_nograd(x_t, first.weight[:, self.obs_dim:-1].contiguous()).view(-1, repeats, h)
        x = F.relu_(x + features).view(-1, h)
        linears = self.net[2::2]
        for i, linear in enumerate(linears):
            x = linear_nograd(x, linear.weight, linear.bias)
            x = F.relu_(x) if i + 1 < len(linears) else x
        return x


class EnsembleLinear(nn.Module):
    def __init__(self, members: int, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(members, d_in, d_out))
        self.bias = nn.Parameter(torch.zeros(members, 1, d_out))
        for w in self.weight.data:
            nn.init.xavier_uniform_(w)

    def forward(self, x):  # x: [E, B, d_in] -> [E, B, d_out]
        return torch.baddbmm(self.bias, x, self.weight)


class CriticEnsemble(nn.Module):
    """Q_1..Q_E(s, a) as one batched module: MLP on concat(s, a), LayerNorm before each ReLU.
    With members=1 and out_dim=act_dim it is the amortised score network f(s, a) ≈ grad_a Q(s, a).

    Besides forward (training, acting), a no-gradient path for many particles per state (transport, TD target):
    obs_features computes the observation part of the first layer once per state, values_from / mean_action_gradient
    take it with `repeats` consecutive actions per state, one member at a time (linear_nograd)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: List[int], members: int = 2,
                 out_dim: Optional[int] = None):
        super().__init__()
        sizes = [obs_dim + act_dim, *hidden_dims, out_dim or 1]
        self.obs_dim, self.members, self.vector_output = obs_dim, members, out_dim is not None
        self.linears = nn.ModuleList(EnsembleLinear(members, a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.norm_weights = nn.ParameterList(nn.Parameter(torch.ones(members, 1, h)) for h in hidden_dims)
        self.norm_biases = nn.ParameterList(nn.Parameter(torch.zeros(members, 1, h)) for h in hidden_dims)

    def forward(self, obs, act):  # [B, obs_dim], [B, act_dim] -> [E, B] (or [E, B, out_dim] with out_dim)
        x = torch.cat([obs, act], -1).expand(self.members, -1, -1)
        for linear, w, b in zip(self.linears[:-1], self.norm_weights, self.norm_biases):
            x = F.relu(F.layer_norm(linear(x), (w.shape[-1],), eps=1e-6) * w + b)
        x = self.linears[-1](x)
        return x if self.vector_output else x.squeeze(-1)

    def obs_features(self, obs):
        """The observation part of the first layer, plus its bias, of every member: [B, S] -> [B, E * H]."""
        first = self.linears[0]
        weight = first.weight[:, :self.obs_dim].permute(0, 2, 1).flatten(0, 1)  # [E * H, S]
        return linear_nograd(obs, weight, first.bias.flatten())

    def first_layers_from(self, features, act, repeats: int):
        """Each member's first-layer output [B * repeats, H] from obs_features [B, E * H] and `repeats` consecutive
        actions per state, act [B * repeats, A] (forward's first layer up to float32 rounding)."""
        b = features.shape[0]
        weights = self.linears[0].weight[:, self.obs_dim:].transpose(1, 2)  # [E, H, A]
        return [(linear_nograd(act, w.contiguous()).view(b, repeats, -1) + f.unsqueeze(1)).view(b * repeats, -1)
                for w, f in zip(weights, features.chunk(self.members, -1))]

    def member_layer(self, i: int, e: int, x):
        linear = self.linears[i]
        return linear_nograd(x, linear.weight[e].t(), linear.bias[e, 0])

    def values_from(self, features, act, repeats: int):
        """Q_e(s, a) [E, B * repeats] for `repeats` consecutive actions per state (see first_layers_from)."""
        values = []
        for e, x in enumerate(self.first_layers_from(features, act, repeats)):
            for i, (w, b) in enumerate(zip(self.norm_weights, self.norm_biases)):  # LayerNorm with its scale, ReLU
                x = self.member_layer(i + 1, e, F.relu_(F.layer_norm(x, (w.shape[-1],), w[e, 0], b[e, 0], 1e-6)))
            values.append(x.squeeze(-1))
        return torch.stack(values)

    def mean_action_gradient(self, features, act, repeats: int):
        """grad_a sum_j mean_e Q_e(s_j, a_j) (the transport's score) for act [B * repeats, A], by hand: one forward
        that keeps what the backward needs, then autograd's backward kernels to the actions only (no weight
        gradients, no observation columns), autograd's result up to float32 rounding."""
        score = 0
        for e, x in enumerate(self.first_layers_from(features, act, repeats)):
            saved = []
            for i, (w, b) in enumerate(zip(self.norm_weights, self.norm_biases)):
                h, mean, rstd = torch.native_layer_norm(x, [w.shape[-1]], w[e, 0], b[e, 0], 1e-6)
                h = F.relu_(h)
                saved.append((x, mean, rstd, h))
                if i + 1 < len(self.norm_weights):
                    x = self.member_layer(i + 1, e, h)
            # d mean_e Q_e / d (last hidden layer) = W_last / E, the same for every row
            grad = (self.linears[-1].weight[e, :, 0] / self.members).expand(act.shape[0], -1)
            for i in reversed(range(len(saved))):
                x, mean, rstd, h = saved[i]
                grad = torch.ops.aten.threshold_backward(grad, h, 0)  # ReLU, then LayerNorm with its scale
                grad = torch.ops.aten.native_layer_norm_backward(grad, x, [x.shape[-1]], mean, rstd,
                                                                 self.norm_weights[i][e, 0], None,
                                                                 [True, False, False])[0]
                weight = self.linears[i].weight[e] if i else self.linears[0].weight[e, self.obs_dim:]  # [in, out]
                grad = linear_nograd(grad, weight)  # grad @ weight.T
            score = score + grad
        return score


def aggregate(qs: torch.Tensor, how: str) -> torch.Tensor:
    return qs.min(0).values if how == "min" else qs.mean(0)


# ---------------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: reference sampler, SVGD transport, action selection
# ---------------------------------------------------------------------------------------------------------------------
def sample_reference(flow: BehaviourFlow, obs: torch.Tensor, flow_steps: int, generator=None,
                     noise: Optional[torch.Tensor] = None, repeats: int = 1) -> torch.Tensor:
    """a ~ mu(.|s): K Euler steps of the learned velocity field from x_0 ~ N(0, I) (or x_0 = noise [B * repeats, A]
    when given), then clip to [-1, 1]; `repeats` consecutive samples per state obs [B, S]."""
    if noise is None:
        noise = torch.randn(obs.shape[0] * repeats, flow.act_dim, device=obs.device, dtype=obs.dtype,
                            generator=generator)
    features, x = flow.obs_features(obs), noise
    for i in range(flow_steps):
        x = x + flow.velocity(features, x, i / flow_steps, repeats) / flow_steps
    return x.clamp(-1.0, 1.0)


def median_bandwidth(sq_dists: torch.Tensor):
    """gamma = 1 / (2h + 1e-6), h = median(d^2) / (2 log(N + 1)) over all N^2 pairs of each state, and d gamma / d d_ij
    (nonzero only at the one or two entries that make the median); [B, N, N] -> [B, 1, 1], [B, N, N]."""
    b, n = sq_dists.shape[0], sq_dists.shape[-1]
    # stable sort, as jnp.median: d_ij = d_ji tie, and the copy that lands at the median index (so the particle that
    # receives d median / d x in the official repulsion) must follow the flat order as it does there
    flat, order = sq_dists.flatten(1).sort(dim=1, stable=True)
    middle = [(n * n - 1) // 2, n * n // 2]
    median = flat[:, middle].mean(1)  # mean of the two middle values, as jnp.median
    h = median / (2.0 * math.log(n + 1.0))
    gamma = 1.0 / (1e-6 + 2.0 * h.clamp_min(1e-12))
    slope = torch.where(h > 1e-12, -gamma.pow(2) / math.log(n + 1.0), 0.0)  # d gamma / d median
    d_gamma = torch.zeros_like(flat).scatter_add(1, order[:, middle], 0.5 * slope[:, None].expand(b, 2))
    return gamma.view(-1, 1, 1), d_gamma.view_as(sq_dists)


def svgd_direction(particles: torch.Tensor, score: torch.Tensor, alpha: float,
                   fixed_bandwidth: bool = False) -> torch.Tensor:
    """phi(x_i) = (1/N) sum_j [k(x_j, x_i) score_j / alpha + grad_{x_j} k(x_j, x_i)] with an RBF kernel (SVGD).
    The repulsion is differentiated through the median bandwidth too (official code), unless fixed_bandwidth."""
    x = particles.detach()
    diff = x.unsqueeze(2) - x.unsqueeze(1)  # [B, N, N, D], x_i - x_j
    sq_dists = diff.pow(2).sum(-1)
    gamma, d_gamma = median_bandwidth(sq_dists)
    kernel = torch.exp(-gamma * sq_dists)  # [B, N, N], symmetric
    # repulsion_i = -d/dx_i sum_jk k(x_j, stop(x_k)) = 2 sum_j w_ij (x_i - x_j), with w = gamma K for the SVGD equation
    # (bandwidth held fixed); the official autodiff adds (sum_jk K_jk d_jk) d gamma / d d_ij through the median
    weights = gamma * kernel
    if not fixed_bandwidth:
        weights = weights + (kernel * sq_dists).sum((1, 2), keepdim=True) * d_gamma
    repulsion = 2.0 * (weights.unsqueeze(-1) * diff).sum(2)
    return (kernel @ score / alpha + repulsion) / x.shape[1]


def transport(q_fn: Callable, obs: torch.Tensor, particles: torch.Tensor, steps: int, step_size: float, alpha: float,
              fixed_bandwidth: bool = False, score_fn: Optional[Callable] = None) -> torch.Tensor:
    """Value gradient flow: `steps` SVGD steps on particles [B, N, A] at states obs [B, S] toward mu exp(Q/alpha).

    q_fn(obs_flat [B*N, S], actions_flat [B*N, A]) -> [B*N]; score_fn(particles) -> grad_a Q [B, N, A] instead of
    autograd through q_fn when given. Each step feeds -phi to a freshly initialised Adam (lr = step_size, betas
    0.9/0.999, eps 1e-8), then clips to [-1, 1]. steps = 0 returns the particles unchanged.
    """
    if steps == 0:
        return particles
    b, n, a = particles.shape
    if score_fn is None:
        obs_flat = obs.unsqueeze(1).expand(b, n, obs.shape[-1]).reshape(b * n, -1)
        score_fn = torch.func.grad(lambda x: q_fn(obs_flat, x.view(b * n, a)).sum())  # x -> grad_a Q(s, a_j)
    return adam_flow(particles, lambda x: svgd_direction(x, score_fn(x), alpha, fixed_bandwidth), steps,
                     step_size)


def amortised_transport(score_net, obs, particles, steps: int, step_size: float, per_state_clip: bool):
    """Amortised VGF: the learned f(s, a) ≈ grad_a Q(s, a) is the velocity (no kernel), with the update's norm clipped
    to 1 (over the whole batch in training, per state when acting, as the official code acts one state at a time)."""
    if steps == 0:
        return particles
    b, n, a = particles.shape
    obs_flat = obs.unsqueeze(1).expand(b, n, obs.shape[-1]).reshape(b * n, -1)
    return adam_flow(particles, lambda x: score_net(obs_flat, x.view(b * n, a))[0].view(b, n, a), steps, step_size,
                     max_norm=1.0, norm_dims=(1, 2) if per_state_clip else (0, 1, 2))


def adam_flow(x, velocity: Callable, steps: int, step_size: float, max_norm: Optional[float] = None, norm_dims=None):
    """x <- clip(x + Adam step along velocity(x), -1, 1), `steps` times, with a freshly initialised Adam (lr step_size,
    betas 0.9/0.999, eps 1e-8) as the official code; optional global-norm clipping of -velocity first."""
    x = x.detach()
    m, v = torch.zeros_like(x), torch.zeros_like(x)
    beta1, beta2 = 0.9, 0.999
    for t in range(1, steps + 1):
        grad = -velocity(x)
        if max_norm is not None:  # optax.clip_by_global_norm
            norm = grad.pow(2).sum(norm_dims, keepdim=True).sqrt()
            grad = torch.where(norm < max_norm, grad, grad / norm * max_norm)
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad * grad
        m_hat, v_hat = m / (1 - beta1 ** t), v / (1 - beta2 ** t)
        x = (x - step_size * m_hat / (v_hat.sqrt() + 1e-8)).clamp(-1.0, 1.0)
    return x


def global_norm_scale(grads: List[torch.Tensor], max_norm: float) -> torch.Tensor:
    """optax.clip_by_global_norm's factor: max_norm / |g| when the global norm |g| >= max_norm, else 1 (torch's
    clip_grad_norm_ divides by |g| + 1e-6 and so differs)."""
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    return torch.where(norm < max_norm, 1.0, max_norm / norm)


def transported_particles(flow, critic, score_net, obs, steps: int, args: Args, generator=None, acting=True,
                          noise=None):
    """N particles per state from mu, moved `steps` steps by VGF on the online critic (or by the amortised score
    network, whose update norm is clipped per state when acting); returns particles [B, N, A].
    Row b * N + i of particles.view(B * N, A) and of noise (x_0 of mu's sampler) is particle i of state b."""
    b, n = obs.shape[0], args.num_particles
    particles = sample_reference(flow, obs, args.bc_flow_steps, generator, noise, repeats=n).view(b, n, -1)
    if score_net is not None:
        particles = amortised_transport(score_net, obs, particles, steps, args.transport_step_size, acting)
    elif steps > 0:
        features = critic.obs_features(obs)  # the same for every particle of a state and every step
        particles = transport(None, obs, particles, steps, args.transport_step_size, args.alpha,
                              args.fixed_bandwidth, lambda x: critic.mean_action_gradient(features, x.view(b * n, -1),
                                                                                         n).view(b, n, -1))
    return particles


@torch.no_grad()
def act(flow, critic, obs, args: Args, transport_steps: int, generator=None, score_net=None,
        noise=None) -> torch.Tensor:
    """pi(s): N particles from mu, L_test transport steps on the online critic, then pick one (argmax Q by default).
    noise: optional x_0 [B * N, A] of mu's sampler (row b * N + i: particle i of state b)."""
    b, n = obs.shape[0], args.num_particles
    particles = transported_particles(flow, critic, score_net, obs, transport_steps, args, generator, noise=noise)
    q = aggregate(critic(obs.repeat_interleave(n, 0), particles.view(b * n, -1)), args.target_q_agg).view(b, n)
    if args.action_selection == "max":
        idx = q.argmax(1)
    elif args.action_selection == "softmax":
        idx = torch.multinomial(torch.softmax(q - q.max(1, keepdim=True).values, 1), 1, generator=generator)[:, 0]
    else:
        idx = torch.randint(0, n, (b,), device=obs.device, generator=generator)
    return particles[torch.arange(b, device=obs.device), idx]


# ---------------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: value learning (TD target from transported particles) and behaviour flow matching
# ---------------------------------------------------------------------------------------------------------------------
@torch.no_grad()  # the transport's score is an input gradient computed by hand (mean_action_gradient)
def td_target(critic, target_critic, flow, batch: Dict[str, torch.Tensor], args: Args, score_net=None) -> torch.Tensor:
    """y = r + gamma * mask * mean_i Q_target(s', a_i), a_i ~ mu(.|s') transported L_train steps on the online Q.
    batch["target_x0"] [B * N, A], when present, is x_0 of mu's sampler (row b * N + i: particle i of s'_b)."""
    b, n = batch["next_observations"].shape[0], args.num_particles
    particles = transported_particles(flow, critic, score_net, batch["next_observations"], args.train_transport_steps,
                                      args, acting=False, noise=batch.get("target_x0"))
    features = target_critic.obs_features(batch["next_observations"])
    next_q = aggregate(target_critic.values_from(features, particles.view(b * n, -1), n), args.target_q_agg)
    return batch["rewards"] + args.discount * batch["masks"] * next_q.view(b, n).mean(1)


def critic_loss_fn(critic, target: torch.Tensor, batch) -> torch.Tensor:
    """Squared TD error of both ensemble members (summed), averaged over the batch."""
    qs = critic(batch["observations"], batch["actions"])  # [E, B]
    return (target - qs).pow(2).sum(0).mean()


def score_matching_loss(score_net, critic, batch) -> torch.Tensor:
    """Amortised VGF: regress f(s, a) onto grad_a mean(Q1, Q2)(s, a) at dataset actions."""
    obs, actions = batch["observations"], batch["actions"]
    with torch.no_grad():
        score = torch.func.grad(lambda a: critic(obs, a).mean(0).sum())(actions)
    return (score_net(obs, actions)[0] - score).pow(2).mean()


def flow_matching_loss(flow, batch) -> torch.Tensor:
    """||v(s, x_t, t) - (a - x_0)||^2 with x_t = (1 - t) x_0 + t a, x_0 ~ N(0, I), t ~ U[0, 1]
    (batch["flow_x0"] [B, A] and batch["flow_t"] [B, 1] when present)."""
    actions = batch["actions"]
    x0 = batch["flow_x0"] if "flow_x0" in batch else torch.randn_like(actions)
    t = batch["flow_t"] if "flow_t" in batch else torch.rand(actions.shape[0], 1, device=actions.device,
                                                            dtype=actions.dtype)
    return (flow(batch["observations"], (1 - t) * x0 + t * actions, t) - (actions - x0)).pow(2).mean()


class Agent(nn.Module):
    """Everything that is trained: the behaviour flow, the critic ensemble and its target, and their optimisers.

    `update` runs the plain eager update (the reference), or with --compile / --cudagraphs the same update as one
    function, `whole_update`, compiled into one graph and/or captured as one CUDA graph."""

    def __init__(self, obs_dim: int, act_dim: int, args: Args):
        super().__init__()
        self.args = args
        self.flow = BehaviourFlow(obs_dim, act_dim, args.hidden_dims)
        self.critic = CriticEnsemble(obs_dim, act_dim, args.hidden_dims)
        self.target_critic = CriticEnsemble(obs_dim, act_dim, args.hidden_dims)
        self.target_critic.load_state_dict(self.critic.state_dict())
        self.target_critic.requires_grad_(False)
        self.score_net = CriticEnsemble(obs_dim, act_dim, args.hidden_dims, 1, act_dim) if args.amortised else None
        self.nets = [self.critic, self.flow] + ([self.score_net] if args.amortised else [])
        self.opts = [torch.optim.Adam(net.parameters(), lr=args.learning_rate, fused=args.fused_adam)
                     for net in self.nets]
        for opt in self.opts:  # a loaded optimiser state holds new tensors: prepare them (and re-capture) again
            opt.register_load_state_dict_post_hook(lambda opt: setattr(self, "_prepared", False))
        self._prepared, self.graph = False, None
        self.whole_update = torch.compile(whole_update, fullgraph=True) if args.compile else whole_update

    def forward(self, batch: Dict[str, torch.Tensor], target: torch.Tensor) -> List[torch.Tensor]:
        """The training losses given the TD target: critic, flow matching (and score matching when amortised)."""
        losses = [critic_loss_fn(self.critic, target, batch), flow_matching_loss(self.flow, batch)]
        if self.args.amortised:
            losses.append(score_matching_loss(self.score_net, self.critic, batch))
        return losses

    def update(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """One gradient step on every network; returns detached metrics (no host sync)."""
        if not self._prepared:
            self.prepare_optimisers()
        graphs = self.args.cudagraphs and self.critic.linears[0].weight.is_cuda  # CUDA graphs: CUDA only
        if self.whole_update is None or not (self.args.compile or graphs):
            return eager_update(self, batch)
        try:
            return self.replay_graph(batch) if graphs else self.whole_update(self, batch, self.adam_states())
        except Exception as e:  # compilation fails without a C++ compiler, for example: nothing was updated yet
            print(f"warning: {'--cudagraphs' if graphs else '--compile'} failed ({type(e).__name__}: "
                  f"{' '.join(str(e).split())[:200]}); continuing with the eager update")
            self.whole_update, self.graph = None, None
            return eager_update(self, batch)

    def prepare_optimisers(self):
        """Adam state created up front (as torch.optim.Adam creates it) so that one function can update it in place;
        capturable on CUDA (the step counts stay on the device: no host sync, CUDA graphs allowed)."""
        for net, opt in zip(self.nets, self.opts):
            cuda = next(net.parameters()).is_cuda
            for group in opt.param_groups:
                group["capturable"] = cuda
                for p in group["params"]:
                    state = opt.state[p]
                    if not state:
                        state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                        state["step"] = torch.zeros((), dtype=torch.float32)
                    on_device = cuda or group.get("fused")
                    state["step"] = state["step"].to(p.device if on_device else "cpu", torch.float32)
        self._prepared, self.graph = True, None

    def adam_states(self) -> List[List[List[torch.Tensor]]]:
        """Per network: [exp_avgs, exp_avg_sqs, steps], in parameter order."""
        return [[[opt.state[p][key] for p in net.parameters()] for key in ("exp_avg", "exp_avg_sq", "step")]
                for net, opt in zip(self.nets, self.opts)]

    def replay_graph(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """--cudagraphs: the whole update captured once as a CUDA graph on static batch buffers, then replayed (one
        launch per update). Warm-up and capture leave the networks, optimisers and RNG as they found them."""
        key = tuple((k, v.shape) for k, v in batch.items())
        if self.graph is None or self.graph[0] != key:
            static = {k: v.clone() for k, v in batch.items()}
            saved = [t.clone() for t in self.mutable_tensors()]
            rng = torch.cuda.get_rng_state()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            try:
                with torch.cuda.stream(stream):  # warm-up (and compilation) off the default stream, as capture needs
                    for _ in range(3):
                        self.whole_update(self, static, self.adam_states())
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    outputs = self.whole_update(self, static, self.adam_states())
            finally:
                with torch.no_grad():
                    for t, s in zip(self.mutable_tensors(), saved):
                        t.copy_(s)
                torch.cuda.set_rng_state(rng)
            self.graph = (key, graph, static, outputs)
        _, graph, static, outputs = self.graph
        for k, v in batch.items():
            static[k].copy_(v)
        graph.replay()
        return {k: v.clone() for k, v in outputs.items()}  # the next replay overwrites the graph's outputs

    def mutable_tensors(self) -> List[torch.Tensor]:
        return [*self.parameters(), *(t for net in self.adam_states() for ts in net for t in ts)]


NET_NAMES = ("critic", "flow", "score_net")  # the attributes of Agent.nets, in order


def eager_update(agent: Agent, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The reference update: TD target, losses, backward, Polyak update, torch.optim.Adam steps, op by op."""
    args = agent.args
    target = td_target(agent.critic, agent.target_critic, agent.flow, batch, args, agent.score_net)
    losses = agent(batch, target)
    for opt in agent.opts:
        opt.zero_grad(set_to_none=True)
    sum(losses).backward()  # the losses share no parameters (the score target is detached)
    with torch.no_grad():  # Polyak update from the pre-update critic, as the official code
        torch._foreach_lerp_(list(agent.target_critic.parameters()), list(agent.critic.parameters()), args.tau)
    for net, opt in zip(agent.nets, agent.opts):
        if args.amortised:  # the amortised variant clips every optimiser's global gradient norm to 1
            grads = [p.grad for p in net.parameters()]
            torch._foreach_mul_(grads, global_norm_scale(grads, 1.0))
        opt.step()
    return update_metrics(losses, target)


def whole_update(agent: Agent, batch: Dict[str, torch.Tensor], adam_states) -> Dict[str, torch.Tensor]:
    """The eager update as one function of tensors (one graph for torch.compile, one CUDA graph): gradients by
    torch.func.grad, Adam (the math of torch.optim.Adam, on its state) and the Polyak update in place."""
    args = agent.args
    target = td_target(agent.critic, agent.target_critic, agent.flow, batch, args, agent.score_net)
    params = {name: p for name, p in agent.named_parameters() if p.requires_grad}

    def total_loss(params):
        losses = torch.func.functional_call(agent, params, (batch, target))
        return sum(losses), losses

    grads, losses = torch.func.grad(total_loss, has_aux=True)(params)
    with torch.no_grad():
        torch._foreach_lerp_(list(agent.target_critic.parameters()), list(agent.critic.parameters()), args.tau)
        for prefix, net, opt, (exp_avgs, exp_avg_sqs, steps) in zip(NET_NAMES, agent.nets, agent.opts, adam_states):
            net_grads = [grads[f"{prefix}.{name}"] for name, _ in net.named_parameters()]
            if args.amortised:  # the amortised variant clips every optimiser's global gradient norm to 1
                net_grads = torch._foreach_mul(net_grads, global_norm_scale(net_grads, 1.0))
            group = opt.param_groups[0]
            adam_step(list(net.parameters()), net_grads, exp_avgs, exp_avg_sqs, steps, group["lr"], *group["betas"],
                      group["eps"])
    return update_metrics(losses, target)


def adam_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr: float, beta1: float, beta2: float, eps: float):
    """torch.optim.Adam's update (no weight decay), in place, with the step counts as tensors (no host sync)."""
    torch._foreach_add_(steps, 1.0)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    step = steps[0]  # one count per network
    bias_correction1, bias_correction2 = 1 - beta1 ** step, 1 - beta2 ** step
    denom = torch._foreach_div(torch._foreach_sqrt(exp_avg_sqs), bias_correction2.sqrt())
    torch._foreach_add_(denom, eps)
    torch._foreach_mul_(denom, bias_correction1 / lr)
    torch._foreach_sub_(params, torch._foreach_div(exp_avgs, denom))


def update_metrics(losses: List[torch.Tensor], target: torch.Tensor) -> Dict[str, torch.Tensor]:
    metrics = {"losses/critic_loss": losses[0].detach(), "losses/bc_flow_loss": losses[1].detach(),
               "charts/td_target_mean": target.mean()}
    if len(losses) > 2:
        metrics["losses/score_loss"] = losses[2].detach()
    return metrics


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation: all episodes of one L_test run as a batch of environments, one forward pass per step
# ---------------------------------------------------------------------------------------------------------------------
def evaluate(agent: Agent, envs: List[gym.Env], args: Args, transport_steps: int, seed: int, device) -> Dict:
    generator = torch.Generator(device=device).manual_seed(seed)
    obs = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(envs)]).astype(np.float32)
    returns, successes = np.zeros(len(envs)), np.zeros(len(envs))
    running = np.ones(len(envs), bool)
    while running.any():
        idx = np.flatnonzero(running)
        actions = act(agent.flow, agent.critic, torch.as_tensor(obs[idx], device=device), args, transport_steps,
                      generator, agent.score_net).cpu().numpy()
        for a, i in zip(actions, idx):
            o, r, terminated, truncated, info = envs[i].step(a)
            obs[i], returns[i] = o, returns[i] + r
            if terminated or truncated:
                running[i], successes[i] = False, float(info.get("success", 0.0))
    scores = np.array([episode_score(args.env_id, r, s) for r, s in zip(returns, successes)])
    return dict(score_mean=float(scores.mean()), score_std=float(scores.std()), return_mean=float(returns.mean()),
                success_rate=float(successes.mean()), episodes=len(envs))


def evaluate_all(agent, envs, args: Args, step: int, device, writer=None, run_dir=None) -> List[Dict]:
    metric = "success_rate_percent" if parse_env_id(args.env_id)["suite"].startswith("ogbench") else \
        "d4rl_normalized_score"
    rows = []
    for L in args.eval_transport_steps:
        start = time.time()
        row = dict(env_id=args.env_id, seed=args.seed, step=step, L_test=L, metric=metric,
                   **evaluate(agent, envs, args, L, seed=args.seed * 1_000_003 + 10_007 * L + 1, device=device))
        row["time_s"] = round(time.time() - start, 3)
        rows.append(row)
        if writer is not None:
            writer.add_scalar(f"eval/score_L{L}", row["score_mean"], step)
            writer.add_scalar(f"eval/score_std_L{L}", row["score_std"], step)
            writer.add_scalar(f"eval/return_L{L}", row["return_mean"], step)
    if run_dir is not None:
        with open(os.path.join(run_dir, "eval.jsonl"), "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"\n[eval @ step {step}] {metric} over {rows[0]['episodes']} episodes")
    print("  L_test |   mean |    std | return\n" + "\n".join(
        f"  {r['L_test']:6d} | {r['score_mean']:6.1f} | {r['score_std']:6.1f} | {r['return_mean']:.1f}" for r in rows))
    return rows


def write_plots(run_dir: str):
    """eval_curve.png: score over gradient steps, one line per L_test; test_time_scaling.png: final score vs L_test."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_evaluations(run_dir)
    if not rows:
        return
    label = "success rate (%)" if rows[0]["metric"] == "success_rate_percent" else "D4RL normalised score"
    name = f"{rows[0]['env_id']}, seed {rows[0]['seed']}" if "env_id" in rows[0] else os.path.basename(run_dir)
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for L in sorted({r["L_test"] for r in rows}):
        points = sorted((r["step"], r["score_mean"]) for r in rows if r["L_test"] == L)
        ax.plot(*zip(*points), marker="o", label=f"L_test = {L}")
    ax.set(xlabel="gradient step", ylabel=label, title=name)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)  # beside the axes, never over a line
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "eval_curve.png"), dpi=120)
    final = sorted((r for r in rows if r["step"] == rows[-1]["step"]), key=lambda r: r["L_test"])
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.errorbar([r["L_test"] for r in final], [r["score_mean"] for r in final], marker="o", capsize=3,
                yerr=[r["score_std"] / math.sqrt(r["episodes"]) for r in final])  # standard error over episodes
    ax.set_xticks([r["L_test"] for r in final])  # L_test is an integer: a tick at each evaluated value only
    ax.set(xlabel="test-time transport steps L_test", ylabel=label,
           title=f"{name}\ntest-time scaling at step {final[0]['step']}")
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "test_time_scaling.png"), dpi=120)
    plt.close("all")


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints: everything needed to resume bit for bit or to evaluate
# ---------------------------------------------------------------------------------------------------------------------
def save_checkpoint(path: str, agent: Agent, args: Args, step: int, dims: Dict, online_transitions=None):
    state = dict(format=CHECKPOINT_FORMAT, args=asdict(args), step=step, dims=dims,
                 online_transitions=online_transitions or {},
                 nets=[net.state_dict() for net in agent.nets], opts=[opt.state_dict() for opt in agent.opts],
                 target_critic=agent.target_critic.state_dict(),
                 rng=dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                          cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None))
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)  # a crash mid-write never corrupts the last good checkpoint


def load_checkpoint(path: str) -> Dict:
    if os.path.isdir(path):
        inside = os.path.join(path, "checkpoint.pt")
        hint = f"pass {inside}" if os.path.isfile(inside) else "pass the checkpoint.pt file (--save-model writes one)"
        raise VGFError(f"checkpoint {path} is a folder, not a checkpoint file; {hint}")
    if not os.path.isfile(path):
        raise VGFError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise VGFError(f"{path} is not a readable checkpoint ({e})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise VGFError(f"{path} is not a vgf_offline.py checkpoint (expected format '{CHECKPOINT_FORMAT}')")
    return state


STRUCTURAL_FIELDS = ("env_id", "hidden_dims", "amortised")  # a checkpoint cannot be loaded if these differ


def merge_checkpoint_args(cli: Args, saved: Dict, path: str, explicit: Optional[set] = None) -> Args:
    """Fields given on the command line (explicit; default: those set away from their defaults) win, except
    structural ones, which must match."""
    if explicit is None:
        defaults = Args()
        explicit = {name for name, value in asdict(cli).items() if value != getattr(defaults, name)}
    for name in STRUCTURAL_FIELDS:
        if name in explicit and getattr(cli, name) != saved[name]:
            raise VGFError(f"checkpoint {path} is incompatible: it was trained with --{name.replace('_', '-')} "
                           f"{saved[name]}, but {getattr(cli, name)} was given")
    saved = dict(saved)
    if "kernel_grad_through_bandwidth" in saved:  # checkpoints written before the option was renamed
        saved["fixed_bandwidth"] = not saved.pop("kernel_grad_through_bandwidth")
    if saved.pop("cpu_onednn_matmul", False):  # the former default, reduced precision on some CPUs
        print(f"note: checkpoint {path} was trained with bf16 CPU matmuls; this run uses exact float32 unless "
              "--cpu-bf16-matmul is given")
    known = {f.name for f in fields(Args)}
    unknown = sorted(set(saved) - known)
    if unknown:
        print(f"warning: checkpoint {path} has options this version does not know, ignored: {unknown}")
    saved = {k: v for k, v in saved.items() if k in known}
    merged = Args(**saved)
    for name in explicit & set(saved):
        setattr(merged, name, getattr(cli, name))
    return merged


def restore_agent(agent: Agent, state: Dict, path: str):
    try:
        agent.target_critic.load_state_dict(state["target_critic"])
        for module, saved in zip(agent.nets + agent.opts, state["nets"] + state["opts"], strict=True):
            module.load_state_dict(saved)
    except (RuntimeError, KeyError, ValueError) as e:
        raise VGFError(f"checkpoint {path} does not fit this configuration: {e}") from None


# ---------------------------------------------------------------------------------------------------------------------
def cpu_bf16_supported() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def set_matmul_precision(args: Args):
    """CUDA: TF32 with --tf32 (JAX's default on GPUs). CPU: exact float32 unless --cpu-bf16-matmul."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.mkldnn.matmul.fp32_precision = "bf16" if args.cpu_bf16_matmul and cpu_bf16_supported() else "none"


def cpu_threads_warning(load: float, cores: int, threads: int) -> Optional[str]:
    """PyTorch starts one thread per core; when other programs keep the cores busy, its threads wait on each other
    and a step can be tens of times slower."""
    if threads > 1 and load + threads > cores + 0.5:
        return (f"warning: the CPU is busy (load {load:.1f} on {cores} cores) and PyTorch uses {threads} threads, "
                "which can make each step many times slower; run with OMP_NUM_THREADS=1 or --threads 1")
    return None


def online_step(agent: Agent, online: Dict, buffer: Dict[str, torch.Tensor], args: Args, step: int, reward_transform,
                writer, device):
    """Offline-to-online: one step of online["env"] acting with best-of-N (L = 0); the transition is appended to the
    buffer after the offline data (online["size"] counts the filled rows) and finished episodes are logged."""
    env = online["env"]
    if online["obs"] is None:
        online["obs"], online["return"] = env.reset(seed=args.seed + step)[0], 0.0
    obs = torch.as_tensor(online["obs"], dtype=torch.float32, device=device)[None]
    action = act(agent.flow, agent.critic, obs, args, 0, score_net=agent.score_net)[0].cpu().numpy()
    next_obs, reward, terminated, truncated, info = env.step(action)
    transition = dict(observations=online["obs"], actions=action, rewards=reward_transform(reward),
                      next_observations=next_obs, masks=1.0 - float(terminated))
    for k, v in transition.items():
        buffer[k][online["size"]] = torch.as_tensor(v, dtype=torch.float32)
    online["size"], online["return"], online["obs"] = online["size"] + 1, online["return"] + reward, next_obs
    if terminated or truncated:
        success, online_steps = float(info.get("success", 0.0)), step - args.total_steps
        writer.add_scalar("online/episode_return", online["return"], online_steps)
        writer.add_scalar("online/episode_score", episode_score(args.env_id, online["return"], success), online_steps)
        writer.add_scalar("online/success", success, online_steps)
        online["obs"] = None


def make_run_folder(run_dir: str):
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        raise VGFError(f"cannot create the run folder {run_dir} ({e.strerror or e}); pass another --output-dir") \
            from None


def main(args: Args, explicit: Optional[set] = None):
    """explicit: the options named on the command line (given_options); they win over a checkpoint's values."""
    if args.eval_only or args.resume:
        path = args.checkpoint if args.eval_only else args.resume
        if args.eval_only and not path:
            raise VGFError("--eval-only needs --checkpoint PATH")
        state = load_checkpoint(path)
        explicit_run_name = args.run_name
        args = merge_checkpoint_args(args, state["args"], path, explicit)
        if args.eval_only and not explicit_run_name:  # never append to the training run's eval.jsonl
            args.run_name = f"{state['args']['run_name']}__eval_step{state['step']}"
    unset = [name for name in task_defaults(args) if getattr(args, name) is None]
    args = resolve_suite_defaults(args)
    validate(args)  # before anything is built or written
    if unset:  # where they come from: README, "Defaults"
        print(f"{args.env_id} ({parse_env_id(args.env_id)['suite']}) defaults: "
              + ", ".join(f"{name} {getattr(args, name)}" for name in unset))
    last = args.total_steps + args.online_steps
    if args.resume and state["step"] >= last:
        print(f"{path} holds a finished run: step {state['step']} of {last} (--total-steps {args.total_steps}, "
              f"--online-steps {args.online_steps}); nothing to train. Pass a larger --total-steps to train on, or "
              f"evaluate it with --eval-only --checkpoint {path}")
        return os.path.join(args.output_dir, args.run_name)
    args.run_name = run_name = args.run_name or f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join(args.output_dir, run_name)
    own_folder = args.resume and run_name == state["args"]["run_name"]
    check_run_folder(run_dir, state["step"] if own_folder else None)
    if own_folder and os.path.isdir(run_dir):
        drop_evaluations_past(run_dir, state["step"])

    # TRY NOT TO MODIFY: seeding, device and threads
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    set_matmul_precision(args)
    if args.cpu_bf16_matmul and device.type == "cpu":
        print("warning: --cpu-bf16-matmul: reduced-precision CPU matmuls (README, 'Speed')" if cpu_bf16_supported()
              else "warning: --cpu-bf16-matmul has no effect: this CPU has no AVX512-BF16; float32 stays exact")
    if args.threads:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu" and (warning := cpu_threads_warning(os.getloadavg()[0], os.cpu_count() or 1,
                                                                   torch.get_num_threads())):
        print(warning)

    if not args.eval_only:  # the dataset first: a missing or bad file is reported before environments are built
        data, reward_scale, reward_shift = load_dataset(args)
        if args.batch_size > len(data["observations"]):
            raise VGFError(f"--batch-size {args.batch_size} is larger than the dataset ({len(data['observations'])} "
                           f"transitions); pass --batch-size {len(data['observations'])} or less")
    eval_envs = [make_eval_env(args.env_id) for _ in range(args.eval_episodes)]
    obs_dim, act_dim = eval_envs[0].observation_space.shape[0], eval_envs[0].action_space.shape[0]
    agent = Agent(obs_dim, act_dim, args).to(device)
    dims = dict(obs_dim=obs_dim, act_dim=act_dim)
    start_step = 0
    if args.eval_only or args.resume:
        if state["dims"] != dims:
            raise VGFError(f"checkpoint {path} has dimensions {state['dims']}, the environment {dims}")
        restore_agent(agent, state, path)
        start_step = state["step"]

    if args.eval_only:
        print(f"evaluating {args.checkpoint} (step {start_step}) on {args.env_id}")
        make_run_folder(run_dir)
        evaluate_all(agent, eval_envs, args, start_step, device, run_dir=run_dir)
        write_plots(run_dir)
        return run_dir

    if data["observations"].shape[1] != obs_dim or data["actions"].shape[1] != act_dim:
        raise VGFError(f"dataset dimensions obs {data['observations'].shape[1]}, act {data['actions'].shape[1]} do "
                       f"not match the environment's obs {obs_dim}, act {act_dim}")
    offline_size = len(data["observations"])
    # the whole dataset lives on the device, with room for the online transitions of offline-to-online fine-tuning
    buffer = {k: torch.zeros((offline_size + args.online_steps, *v.shape[1:]), dtype=torch.float32, device=device)
              for k, v in data.items()}
    for k, v in data.items():
        buffer[k][:offline_size] = torch.as_tensor(v, device=device)
    del data
    print(f"{args.env_id}: {offline_size} transitions, obs {obs_dim}, act {act_dim}, device {device}")
    online = dict(size=offline_size, obs=None, env=make_eval_env(args.env_id) if args.online_steps else None)
    if args.resume:  # RNG states last, so that sampling continues exactly where the checkpoint left off
        for k, v in state.get("online_transitions", {}).items():
            buffer[k][offline_size: offline_size + len(v)] = v.to(device)
        online["size"] += len(state.get("online_transitions", {}).get("rewards", []))
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    # TRY NOT TO MODIFY: logging (tensorboard always, wandb with --track), created once the inputs are known good
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    make_run_folder(run_dir)
    if args.resume:
        print(f"resuming from step {start_step} of {last} ({path}) in {run_dir}")
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=run_name, save_code=True)
    writer = SummaryWriter(run_dir)
    table = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    checkpoint_path = os.path.join(run_dir, "checkpoint.pt")
    online_transitions = lambda: {k: v[offline_size: online["size"]].cpu() for k, v in buffer.items()}
    reward_transform = lambda r: r * reward_scale + reward_shift

    # ALGO LOGIC: training loop (offline steps, then optional online fine-tuning with one env step per iteration)
    saved_step = None  # the step checkpoint_path holds (for the Ctrl-C message)
    if os.path.exists(checkpoint_path):
        resumed_here = args.resume and os.path.samefile(checkpoint_path, path)
        saved_step = start_step if resumed_here else load_checkpoint(checkpoint_path)["step"]
    first_bad_step = torch.tensor(-1, device=device)  # first step with a non-finite loss, tracked without host sync
    progress = tqdm(total=last, initial=start_step, dynamic_ncols=True, smoothing=0.05)
    last_time, last_step, metrics, step = time.time(), start_step, None, start_step
    try:
        if args.compile:
            progress.write("compiling the update with torch.compile (about a minute; --no-compile skips it)")
        for step in range(start_step + 1, last + 1):
            if step > args.total_steps:
                online_step(agent, online, buffer, args, step, reward_transform, writer, device)
            if step <= args.total_steps or step - args.total_steps >= args.online_warmup:
                idx = torch.randint(0, online["size"], (args.batch_size,), device=device)
                batch = {k: v[idx] for k, v in buffer.items()}
                metrics = agent.update(batch)
                finite = torch.isfinite(metrics["losses/critic_loss"]) & torch.isfinite(metrics["losses/bc_flow_loss"])
                first_bad_step = torch.where((first_bad_step < 0) & ~finite, step, first_bad_step)
            progress.update(1)

            # logging: at the first step, every log_every steps and at every evaluation
            is_eval = step == last or (args.eval_every and step % args.eval_every == 0)
            first = step == start_step + 1
            if (first or step % args.log_every == 0 or is_eval) and metrics is not None:
                if first_bad_step.item() >= 0:
                    kept = f"The last good checkpoint is {checkpoint_path}. " if os.path.exists(checkpoint_path) else ""
                    raise VGFError(f"non-finite loss at step {first_bad_step.item()}; stopped. {kept}"
                                   "Try a smaller --transport-step-size or --learning-rate.")
                values = {k: v.item() for k, v in metrics.items()}
                for k, v in values.items():
                    writer.add_scalar(k, v, step)
                postfix = dict(critic=f"{values['losses/critic_loss']:.3g}", bc=f"{values['losses/bc_flow_loss']:.3g}")
                if not first:
                    sps = (step - last_step) / max(time.time() - last_time, 1e-9)
                    writer.add_scalar("charts/SPS", sps, step)
                    postfix["sps"], last_time, last_step = f"{sps:.1f}", time.time(), step
                progress.set_postfix(postfix)
            if first:  # keep the first step (torch.compile's compilation) out of steps per second and the ETA
                progress.reset(total=last)
                progress.initial = progress.n = progress.last_print_n = step
                last_time, last_step = time.time(), step

            # evaluation and checkpoint
            if is_eval:
                evaluate_all(agent, eval_envs, args, step, device, writer, run_dir)
                if args.save_model:
                    save_checkpoint(checkpoint_path, agent, args, step, dims, online_transitions())
                    saved_step = step
                    print(f"checkpoint saved to {checkpoint_path}")
    except KeyboardInterrupt:
        kept = f"; the last checkpoint {checkpoint_path} holds step {saved_step} (continue with --resume " \
               f"{checkpoint_path})" if saved_step is not None else "; no checkpoint was saved (--save-model keeps one)"
        raise KeyboardInterrupt(f"interrupted at step {step}{kept}") from None
    finally:
        progress.close()
    writer.close()
    write_plots(run_dir)
    if args.track:
        wandb.finish()
    return run_dir


if __name__ == "__main__":
    try:
        main(tyro.cli(Args), given_options(sys.argv[1:]))
    except VGFError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:  # one line, no traceback
        print(f"\n{e.args[0] if e.args else 'interrupted'}", file=sys.stderr)
        sys.exit(130)
