"""Runs several recipes one after another in one torchrun launch (process start-up is the slow part):
``python -m torch.distributed.run ... fsdp_worker.py recipes.json``. Each recipe is trained with
``efft.train.train``, which writes its card and final weights under the recipe's output_dir."""
import json
import sys


def main(path: str) -> None:
    from efft import config
    from efft.train import train

    for name, recipe in json.loads(open(path).read()).items():
        print(f"fsdp_worker: {name}", flush=True)
        train(config.validate(recipe, source=name))


if __name__ == "__main__":
    main(sys.argv[1])
