"""Measure a long-context method: python run.py [group=option ...] [key=value ...]  (see the README)

python run.py                                          # perplexity of SmolLM2 on Canterbury, 4k/8k/16k
python run.py rope=consistent_ntk ctx=32768
python run.py -m rope=none,dynamic_ntk,consistent_ntk rope.alpha=1,2,4 ctx=8192,16384
"""

import hydra
from omegaconf import DictConfig

from enhance_long.runner import run


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
