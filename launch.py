"""Entry point: compose the config with Hydra and run one grid point (or a sweep with -m).

    python launch.py                              # one run of the embedded default
    python launch.py -m trunc=0.25,0.5,1.0        # a sweep; a summary table and plot at the end
    python launch.py --help                       # the groups, their choices and every key
    python launch.py --cfg job                    # print the resolved config
"""

import hydra
from omegaconf import DictConfig

from kd_sweeps.cli_help import did_you_mean, register_help
from kd_sweeps.schema import register_configs

register_configs()
register_help()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    from kd_sweeps.entry import run_point  # heavy imports only once a job really runs

    return run_point(cfg)


if __name__ == "__main__":
    with did_you_mean():  # an unknown key or choice: Hydra's error, then the closest names
        main()
