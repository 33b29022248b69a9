"""Fuzzing mllama-q with hostile inputs: `python -m tools.fuzz` (from the repository root).

    python -m tools.fuzz                            # every family, 1000 cases each
    python -m tools.fuzz --family gguf -n 100000 --seed 7 --jobs 2 --out /tmp/fuzz-failures
    python -m tools.fuzz --replay /tmp/fuzz-failures/gguf-7-1234-crash.pkl     # rerun one case here

A FAMILY is a module `tools/fuzz/<family>.py` listed in FAMILIES below, exposing

    generate(seed: int, n: int) -> Iterator[case]   # n cases, deterministic in (seed, index);
                                                    # a case is any picklable object
    run(case) -> None                               # exercise the library with it

`run` returning or raising a ValueError subclass (ModelFileError and the other documented
clean errors) is a clean outcome; any other exception is UNCLEAN, a signal (segfault, abort)
is a CRASH, and a case running past the timeout (20 s) is a HANG. The runner (runner.py) runs
the cases in child processes forked from a parent that imported the family (and so the
library) once, a small batch per child, so a crash or hang costs one child and the batch goes
on in a new one; it prints a summary and saves every failing case (pickle + description, and
the input file itself when the case has `materialize()`) for reproduction.
"""

# Family name -> module tools.fuzz.<name>. Add a family by adding its module and its name here.
FAMILIES = ("gguf",)
