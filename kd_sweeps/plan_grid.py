"""The plan's grid: every point's overrides and job config exactly as ``launch.py -m`` makes them,
what its launcher gives it (processes, time limit, requeues, GPUs) and the folder its job writes."""

from __future__ import annotations

import copy
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import product
from pathlib import Path

# Hydra's public API only (hydra-core 1.3): the config loader that ``launch.py -m`` composes with (the
# same object Hydra hands its sweepers and launchers), its override parser and its override type.
from hydra import initialize_config_dir
from hydra.core.config_loader import ConfigLoader
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.core.plugins import Plugins
from hydra.errors import ConfigCompositionException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

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


def _config_loader(config_dir: Path) -> ConfigLoader:
    """Hydra's config loader for ``config_dir``, made as ``launch.py`` makes it (task name ``launch``).
    Any Hydra initialised before (a test's compose, a running app) is put back afterwards."""
    previous = GlobalHydra.instance().hydra
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(Path(config_dir).resolve()), job_name="launch", version_base="1.3"):
            return GlobalHydra.instance().config_loader()  # a self-contained object: usable afterwards
    finally:
        GlobalHydra.instance().clear()
        if previous is not None:
            GlobalHydra.instance().initialize(previous)


def _sweep_product(parsed: list[Override], max_batch_size) -> list[list[str]]:
    """The points of Hydra 1.3's basic sweeper (``BasicSweeper.split_arguments``), in its order: one
    list per key in first-seen order (a repeated key keeps its first place and takes its last values),
    sweeps as their string values, then the cartesian product with the first key outermost. Its
    batches of ``max_batch_size`` points are launched one after the other, so the order is the same."""
    if max_batch_size is not None and max_batch_size <= 0:
        raise PlanError(f"hydra.sweeper.max_batch_size={max_batch_size}: must be a positive integer or null")
    values_per_key: OrderedDict[str, list[str]] = OrderedDict()
    for override in parsed:
        key = override.get_key_element()
        if not override.is_sweep_override():
            values_per_key[key] = [f"{key}={override.get_value_element_as_str()}"]
        elif override.is_discrete_sweep():
            values_per_key[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            raise PlanError(f"{override.input_line}: the basic sweeper does not support sweep type "
                            f"{override.value_type.name}; use a,b, choice(), range() or glob()")
    return [list(point) for point in product(*values_per_key.values())]


class GridComposer:
    """Expands and composes grid points as ``launch.py -m <overrides>`` would."""

    def __init__(self, overrides: list[str], config_name: str = "config", config_dir: Path = CONF_DIR):
        from kd_sweeps.schema import register_configs

        register_configs()
        Plugins.instance()  # registers the launcher plugins' configs (hydra/launcher=submitit_*)
        self.loader = _config_loader(config_dir)
        # The sweep's own config, as Hydra's multirun composes it before expanding the grid.
        self.master = self.loader.load_configuration(config_name, list(overrides), run_mode=RunMode.MULTIRUN)
        self.parser = OverridesParser.create(config_loader=self.loader)  # glob() lists config groups
        self._groups: dict[str, bool] = {}
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
        # As the basic sweeper: its params from the config first, then the command line's task overrides.
        params = [f"{key}={value}" for key, value in (sweeper.params or {}).items()]
        task = OmegaConf.to_container(self.master.hydra.overrides.task, resolve=False)
        return _sweep_product(self.parser.parse_overrides(params + list(task)), sweeper.max_batch_size)

    def compose(self, point: list[str]) -> DictConfig:
        """The job config of one point (no ``hydra`` node), as its job would receive it."""
        with self.composed(point) as cfg:
            return copy.deepcopy(cfg)

    def _is_group(self, key: str) -> bool:
        # Hydra asks its config sources the same question (a folder, or a ConfigStore group).
        if key not in self._groups:
            self._groups[key] = any(source.is_group(key) for source in self.loader.get_sources())
        return self._groups[key]

    def _split(self, point: list[str]):
        """(config-value overrides, group choices) of a point, split as Hydra's defaults list splits
        them: a dict value or a key that names no config group is a value override."""
        parsed = [self._parse(line) for line in point]
        values = [o for o in parsed if not o.is_sweep_override()
                  and (isinstance(o.value(), dict) or not self._is_group(o.key_or_group))]
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
        # Keys that appear or vanish (+, ++, ~) are not worth restoring: such a point gets its own copy,
        # which is also left as it is afterwards (a deleted key cannot be set again in struct mode).
        shared = not any(o.is_add() or o.is_force_add() or o.is_delete() for o in values)
        if not shared:
            work = copy.deepcopy(pristine)
        touched = {o.key_or_group.split(".")[0] for o in values}
        try:
            _apply_value_overrides(values, work)
            yield work
        finally:
            for key in touched & set(pristine.keys()) if shared else ():
                work[key] = pristine._get_node(key)  # assigning a node copies it


def _apply_value_overrides(overrides: list[Override], cfg: DictConfig) -> None:
    """Apply a point's value overrides to its composed config with the rules and messages of Hydra
    1.3's config loader (``ConfigLoaderImpl._apply_overrides_to_config``, which it runs right after
    composing the defaults list): ``~key`` deletes, ``+key`` adds, ``++key`` adds or sets, ``key``
    sets an existing key, dicts and lists merged in."""
    for override in overrides:
        key = override.key_or_group
        if override.package is not None:
            raise ConfigCompositionException(f"Override {override.input_line} looks like a config group "
                                             f"override, but config group '{key}' does not exist.")
        value = override.value()
        try:
            if override.is_delete():
                _delete(cfg, key, value)
            elif override.is_add():
                if OmegaConf.select(cfg, key, throw_on_missing=False) is not None and \
                        not isinstance(value, (dict, list)):
                    raise ConfigCompositionException(
                        f"Could not append to config. An item is already at '{key}'.\n"
                        f"Either remove + prefix: '{override.input_line[1:]}'\n"
                        f"Or add a second + to add or override '{key}': '+{override.input_line}'\n")
                OmegaConf.update(cfg, key, value, merge=True, force_add=True)
            elif override.is_force_add():
                OmegaConf.update(cfg, key, value, merge=True, force_add=True)
            else:
                try:
                    OmegaConf.update(cfg, key, value, merge=True)
                except (ConfigAttributeError, ConfigKeyError) as err:
                    raise ConfigCompositionException(f"Could not override '{key}'.\n"
                                                     f"To append to your config use +{override.input_line}") from err
        except OmegaConfBaseException as err:
            raise ConfigCompositionException(f"Error merging override {override.input_line}") from err


def _delete(cfg: DictConfig, key: str, value) -> None:
    """``~key`` (or ``~key=value``: only if that is its value), as Hydra deletes."""
    current = OmegaConf.select(cfg, key, throw_on_missing=False)
    if current is None:
        raise ConfigCompositionException(f"Could not delete from config. '{key}' does not exist.")
    if value is not None and value != current:
        raise ConfigCompositionException(
            f"Could not delete from config. The value of '{key}' is {current} and not {value}.")
    parent, _, leaf = key.rpartition(".")
    with open_dict(cfg):
        del (OmegaConf.select(cfg, parent) if parent else cfg)[leaf]


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
