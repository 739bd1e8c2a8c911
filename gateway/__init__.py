"""kvgate gateway: the HTTP server, proxying, admission and the command line."""
