"""One module per `retrack` subcommand; each exposes `register(subparsers)`."""
