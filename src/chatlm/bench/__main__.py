"""`python -m chatlm.bench`: the Hydra edge of the benchmarks (body: chatlm.bench.stage.bench)."""

from chatlm.bench.stage import bench
from chatlm.hydra.app import run_stage


def main() -> None:
    run_stage("bench", bench)


if __name__ == "__main__":
    main()
