"""`atrl bench trainer`, kept at this path for gpu.sh, the docs and the tests: see `atrl.bench.trainer_overhead`."""

from atrl.bench.trainer_overhead import main

if __name__ == "__main__":
    main()
