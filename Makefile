# The two commands a newcomer needs: `make demo` and `make test`.
.PHONY: demo test tools build lint unit e2e crd

tools:
	tests/tools/install

build:
	cargo build --locked --bins --examples

demo: tools build
	cargo run --locked --quiet --example demo

lint:
	cargo fmt --check
	cargo clippy --locked --all-targets -- -D warnings

# everything: tools (built when missing), lint, unit, integration and end-to-end tests
test: tools lint
	cargo test --locked --all-targets

crd:
	cargo run --locked --quiet -- crd > crds/netbirdinstance.yaml
	cargo run --locked --quiet -- crd --helm > charts/netbird-operator/templates/crds.yaml
