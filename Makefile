# banger: build, test, lint, end-to-end tests and benchmarks.
SHELL := /bin/bash
GO ?= go
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
BIN := build/bin
LDFLAGS := -X github.com/bangerdev/banger/internal/cli.Version=$(VERSION) \
           -X github.com/bangerdev/banger/internal/daemon.Version=$(VERSION) \
           -X github.com/bangerdev/banger/internal/guestagent.Version=$(VERSION)
TESTIMAGE ?= $(or $(BANGER_TESTIMAGE_DIR),/var/cache/banger/testimage)
export BANGER_TESTIMAGE_DIR := $(TESTIMAGE)

.PHONY: all build test lint e2e bench check deps testimage clean install

all: build

build:
	$(GO) build -ldflags '$(LDFLAGS)' -o $(BIN)/banger ./cmd/banger
	$(GO) build -ldflags '$(LDFLAGS)' -o $(BIN)/bangerd ./cmd/bangerd
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '-s -w $(LDFLAGS)' -o $(BIN)/banger-vsock-agent ./cmd/banger-vsock-agent

# Unit and integration tests of every package (VM boot tests use the test
# image when it exists: run `make testimage` first).
test:
	$(GO) test -count=1 ./...

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) vet -tags e2e ./test/...
	$(GO) tool staticcheck ./...
	$(GO) tool staticcheck -tags e2e ./test/...
	$(GO) tool go-errorlint -errorf=true -asserts=false -comparison=false ./...
	$(GO) tool go-errorlint -errorf=true -asserts=false -comparison=false -tags e2e ./test/...
	shellcheck --severity=warning scripts/*.sh .ci/run

testimage:
	scripts/make-test-image.sh $(TESTIMAGE)

# End-to-end tests: the real bangerd and banger binaries booting real VMs.
e2e: build testimage
	$(GO) test -count=1 -tags e2e -timeout 70m -v ./test/e2e/

# Benchmarks: boot-to-ready against bare QEMU, vm create for 1 GiB vs
# 20 GiB images, bangerd's resident memory; networking (in namespaces):
# agent-ready to ssh-ready, forwarded vs direct throughput, parallel creates;
# the data path (BenchmarkDataPath: vm exec and vm cp against the raw
# virtio-serial channel of a bare QEMU, docs/dev/data-path.md). One of them:
# make bench BENCH=DataPath.
BENCH ?= .
bench: build testimage
	$(GO) test -tags e2e -run '^$$' -bench '$(BENCH)' -benchtime 1x -timeout 120m ./test/bench/

# The host packages the tests need (apt-get, as root; a no-op when all are there).
deps:
	scripts/install-deps.sh --test

# Everything CI runs; on a fresh machine it first installs what it needs.
check: deps
	$(MAKE) lint build testimage test e2e

install: build
	install -D -m 0755 $(BIN)/banger /usr/local/bin/banger
	install -D -m 0755 $(BIN)/bangerd /usr/local/bin/bangerd
	install -D -m 0755 $(BIN)/banger-vsock-agent /usr/local/lib/banger/banger-vsock-agent
	install -D -m 0644 packaging/bangerd.service /etc/systemd/system/bangerd.service
	test -e /etc/banger/bangerd.toml || install -D -m 0644 packaging/bangerd.toml /etc/banger/bangerd.toml

clean:
	rm -rf build
