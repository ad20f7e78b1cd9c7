"""``python -m mechunlearn``: the command-line interface without the console script (e.g. from
a source checkout on ``PYTHONPATH``)."""

from mechunlearn.cli import main

main()
