"""Fault-injection tests (scenarios F1–F15, one module each): real servers and service
processes, faults injected while a load client records every answer, then a checker compares
the answers with what MySQL and Redis hold."""
