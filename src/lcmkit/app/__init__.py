"""The command line: one module per command (its options dataclass, `add_parser` and `run`), their flags generated
from dataclasses (flags.py), cli.py assembling them and mapping errors to exit codes; the serve page's server
(server.py). Nothing imports it."""
