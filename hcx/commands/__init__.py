"""The ``hcx`` commands, one module per group; each defines ``add_parsers(sub)`` and the
``cmd_*`` functions its parsers call as ``func(args, argv)``."""
