"""`atrl bench credit`, kept at this path for gpu.sh, the docs and the tests: see `atrl.bench.credit_partition`."""

from atrl.bench.credit_partition import main

if __name__ == "__main__":
    main()
