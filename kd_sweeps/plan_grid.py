"""The plan's grid: every point's overrides and job config exactly as ``launch.py -m`` makes them,
what its launcher gives it (processes, time limit, requeues, GPUs) and the folder its job writes."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# Hydra's own multirun machinery (hydra-core is pinned below 1.4, where these modules live): the
# grid and each point's config must come out exactly as ``launch.py -m`` makes them.
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.config_repository import CachingConfigRepository
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.defaults_list import Overrides
from hydra._internal.utils import create_config_search_path
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
POINT_ID = "${kd_point_id:}"  # conf/config.yaml's hydra.sweep.subdir: a point's folder is its id


class PlanError(ValueError):
    """The sweep cannot be expanded at all (bad command line, unsupported sweeper)."""


@dataclass(frozen=True)
class LauncherFacts:
    """What a point's ``hydra.launcher`` gives its job."""

    kind: str  # basic | local | slurm (from the launcher's _target_)
    timeout_min: float | None  # the job's time limit; None: none (basic launcher)
    processes: int  # training processes: tasks_per_node x nodes (submitit), 1 for the basic launcher
    gpus_per_node: int | None  # None or 0: a CPU job (submitit); None also for the basic launcher
    requeues: int  # max_num_timeout: restarts after hitting the time limit (Slurm only), resuming
    sweep_dir: str  # hydra.sweep.dir, unresolved (it may name the point's own keys)
    subdir: str  # hydra.sweep.subdir, unresolved
    nodes: int = 1
    mem_gb: float | None = None  # host memory per node (submitit); None: not set (basic launcher)


def _launcher_facts(base: DictConfig) -> LauncherFacts:
    launcher = base.hydra.launcher
    target = str(launcher.get("_target_", ""))
    kind = "slurm" if "Slurm" in target else "local" if "Local" in target else "basic"

    def value(key, default=None):
        return OmegaConf.select(launcher, key, default=default)

    processes = 1 if kind == "basic" else int(value("tasks_per_node", 1) or 1) * int(value("nodes", 1) or 1)
    sweep = OmegaConf.to_container(base.hydra.sweep, resolve=False)
    return LauncherFacts(kind, value("timeout_min"), processes, value("gpus_per_node"),
                         int(value("max_num_timeout", 0) or 0) if kind == "slurm" else 0,
                         str(sweep.get("dir")), str(sweep.get("subdir")), int(value("nodes", 1) or 1),
                         value("mem_gb"))


class GridComposer:
    """Expands and composes grid points as ``launch.py -m <overrides>`` would."""

    def __init__(self, overrides: list[str], config_name: str = "config", config_dir: Path = CONF_DIR):
        from kd_sweeps.schema import register_configs

        register_configs()
        Plugins.instance()  # registers the launcher plugins' configs (hydra/launcher=submitit_*)
        self.loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(config_dir)))
        self.master = self.loader.load_configuration(config_name, list(overrides), run_mode=RunMode.MULTIRUN)
        self.parser = OverridesParser.create(config_loader=self.loader)  # glob() lists config groups
        self._repo = CachingConfigRepository(self.loader.repository)
        self._bases: dict[tuple[str, ...], tuple[DictConfig, DictConfig]] = {}
        self._launchers: dict[tuple[str, ...], LauncherFacts] = {}
        self._parsed: dict = {}

    def _parse(self, line: str):
        # A grid repeats each override string across many points (100 truncs x 10 sections: 110
        # strings, 1,000 points); parsing each once saves the grammar's ~0.3 ms per string and point.
        if line not in self._parsed:
            self._parsed[line] = self.parser.parse_overrides([line])[0]
        return self._parsed[line]

    def points(self) -> list[list[str]]:
        """Every point's overrides, in the order the basic sweeper launches them."""
        sweeper = self.master.hydra.sweeper
        if not str(sweeper._target_).endswith("BasicSweeper"):
            raise PlanError(f"hydra.sweeper is {sweeper._target_}; the plan expands basic-sweeper grids")
        params = [f"{key}={value}" for key, value in (sweeper.params or {}).items()]
        task = OmegaConf.to_container(self.master.hydra.overrides.task, resolve=False)
        parsed = self.parser.parse_overrides(params + list(task))
        return [point for batch in BasicSweeper.split_arguments(parsed, sweeper.max_batch_size)
                for point in batch]

    def compose(self, point: list[str]) -> DictConfig:
        """The job config of one point (no ``hydra`` node), as its job would receive it."""
        with self.composed(point) as cfg:
            return copy.deepcopy(cfg)

    def _split(self, point: list[str]):
        """(config-value overrides, group choices) of a point, by Hydra's own split: the overrides
        the defaults list consumes vs those applied to config values."""
        parsed = [self._parse(line) for line in point]
        values = Overrides(self._repo, parsed).config_overrides
        value_ids = {id(o) for o in values}
        return values, tuple(o.input_line for o in parsed if id(o) not in value_ids)

    def _base(self, choices: tuple[str, ...]) -> tuple[DictConfig, DictConfig]:
        if choices not in self._bases:
            base = self.loader.load_sweep_config(self.master, list(choices))
            # The launcher (a group choice, e.g. launcher=slurm_gpu_4b_8b) sets the job's processes,
            # time limit and requeues; command-line hydra.launcher.* overrides are already applied.
            self._launchers[choices] = _launcher_facts(base)
            with open_dict(base):
                del base["hydra"]
            self._bases[choices] = (base, copy.deepcopy(base))
        return self._bases[choices]

    def launcher(self, point: list[str]) -> LauncherFacts:
        choices = self._split(point)[1]
        self._base(choices)
        return self._launchers[choices]

    def launcher_timeout_min(self, point: list[str]) -> float | None:
        """The point's job time limit in minutes (``hydra.launcher.timeout_min``; None: no limit)."""
        return self.launcher(point).timeout_min

    def point_dir(self, point: list[str], cfg: DictConfig) -> Path | None:
        """The folder the point's job writes (``hydra.sweep.dir``/``hydra.sweep.subdir``, relative to
        where the launch runs, as Hydra resolves them in the job's config); None if they do not
        resolve here (a resolver only a running Hydra job has)."""
        from kd_sweeps.identity import point_id_resolver

        facts = self.launcher(point)
        try:
            sweep_dir = _resolve_in(cfg, facts.sweep_dir)
            subdir = point_id_resolver(_root_=cfg) if facts.subdir == POINT_ID else _resolve_in(cfg, facts.subdir)
        except Exception:  # e.g. ${now:...} or ${hydra:...}: the folder is only known at launch
            return None
        return Path(sweep_dir) / subdir

    @contextmanager
    def composed(self, point: list[str]):
        """Like ``compose``, valid only inside the ``with`` block: the shared composition of the point's
        group choices is updated in place and restored afterwards, which is several times faster
        than copying a whole config per point."""
        values, choices = self._split(point)
        work, pristine = self._base(choices)
        if any(o.is_add() or o.is_force_add() or o.is_delete() for o in values):
            work = copy.deepcopy(pristine)  # keys appear or vanish: restoring is not worth it
        touched = {o.key_or_group.split(".")[0] for o in values}
        try:
            ConfigLoaderImpl._apply_overrides_to_config(values, work)
            yield work
        finally:
            for key in touched & set(pristine.keys()):
                work[key] = pristine._get_node(key)  # assigning a node copies it


_SCRATCH = "_kd_plan_scratch"


def _resolve_in(cfg: DictConfig, template: str) -> str:
    """``template`` resolved as if it sat in ``cfg`` (``${sweep}`` and the like): placed for a moment
    under ``extra``, a free-form key that no point id includes."""
    with open_dict(cfg):
        cfg.extra[_SCRATCH] = template
        try:
            return str(cfg.extra[_SCRATCH])
        finally:
            del cfg.extra[_SCRATCH]
