"""`atrl bench probe`, kept at this path for gpu.sh, the docs and the tests: see `atrl.bench.probe_overhead`."""

from atrl.bench.probe_overhead import main

if __name__ == "__main__":
    main()
