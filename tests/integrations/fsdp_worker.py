"""Runs several recipes one after another in one torchrun launch (process start-up is the slow part):
``python -m torch.distributed.run ... fsdp_worker.py recipes.json``. Each recipe is trained with
``efft.train.train``, which writes its card and final weights under the recipe's output_dir. An entry
``{"copy": [src, dst]}`` copies a checkpoint written earlier in the launch (rank 0; the others wait)."""
import json
import os
import shutil
import sys


def main(path: str) -> None:
    from efft import config
    from efft.train import train

    for name, recipe in json.loads(open(path).read()).items():
        print(f"fsdp_worker: {name}", flush=True)
        if "copy" in recipe:
            import torch.distributed as dist  # started by the train() before

            if int(os.environ["RANK"]) == 0:
                shutil.copytree(*recipe["copy"])
            dist.barrier()
            continue
        train(config.validate(recipe, source=name))


if __name__ == "__main__":
    main(sys.argv[1])
