"""The command line: parsing, one handler per command, error-to-exit-code mapping; and the serve page. Nothing
imports it."""
