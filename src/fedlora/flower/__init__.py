"""Flower transport: a ServerApp and a ClientApp that run any registered method unchanged."""
