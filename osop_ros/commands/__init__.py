"""``osop`` sub-commands. Each module defines ``register(subparsers)``; heavy imports stay inside handlers."""
