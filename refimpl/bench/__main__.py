"""``python -m refimpl.bench ...``: the benchmark's command line, :func:`refimpl.bench.run.main`."""

from refimpl.bench.run import main

if __name__ == "__main__":
    main()
