# Quick start:  make demo   (the main job)   |   make test   (the test suite)
VENV ?= .venv
PY := $(VENV)/bin/python
export ROS_AUTOMATIC_DISCOVERY_RANGE ?= LOCALHOST

.PHONY: setup demo test test-slow lint bench clean

setup:
	@bash scripts/setup_env.sh

demo: setup
	$(PY) -m osop_ros.cli demo

test: setup
	$(PY) -m ruff check osop_ros test launch setup.py
	$(PY) -m pytest -q test

test-slow: setup
	$(PY) -m pytest -q -m slow test --run-slow

lint: setup
	$(PY) -m ruff check osop_ros test launch setup.py

bench: setup
	$(PY) -m osop_ros.cli bench

clean:
	rm -rf $(VENV) build install log .pytest_cache
