"""`python -m iadgpt`: the same CLI as the `iadgpt` command."""
import sys

from .cli import main

sys.exit(main())
