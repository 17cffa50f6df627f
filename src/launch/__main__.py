"""python -m src.launch {rank_table,msrun,eval} ARGS...: see src/launch/commands.py."""
import sys

from src.launch.commands import main

sys.exit(main())
