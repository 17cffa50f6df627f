"""Offline tools: converters, dataset builders, benchmarks. They import src; src never imports them."""
