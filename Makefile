# Thin targets; the work is in scripts/.
.PHONY: setup demo test adapters clean

setup:
	bash scripts/setup.sh

demo:
	bash scripts/demo.sh

test:
	bash scripts/test.sh

# Regenerate the stored adapters/adapters-solo and adapters/adapters-distributed.
adapters:
	bash scripts/make_adapters.sh

clean:
	rm -rf runs adapters/latest .pytest_cache
