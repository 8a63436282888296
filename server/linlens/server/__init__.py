"""The linlens gRPC server: configuration, job scheduling, generation, the servicer and the process around it.

Entry points: ``build_config(argv)`` parses flags, environment and config file into a ServerConfig;
``serve(config)`` runs the server until SIGTERM/SIGINT; ``start_server(config)`` starts one in-process (tests,
notebooks) and returns a handle to stop it. ``python -m linlens.server`` runs ``serve(build_config())``.
Imports are lazy so that ``linlens.server.config`` loads without torch.
"""
