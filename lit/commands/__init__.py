"""Sub-commands of ``hybridvl``; each module has ``main(argv) -> int``."""
