package guestagent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/bangerdev/banger/internal/agentproto"
)

const usage = `usage:
  banger-vsock-agent serve --config FILE   run the agent server (config: agentproto.Config JSON)
  banger-vsock-agent serve-fd N            run the agent server, config read from file descriptor N
  banger-vsock-agent supervise-fd N        keep an agent server running (restarted when it exits)
  banger-vsock-agent version               print the version
Started by the kernel as ` + agentproto.InitPath + ` (or as PID 1), it is the VM's init:
it mounts the root disk, starts the agent server and hands PID 1 to the image's init.
`

// Main is the guest agent's entry point (cmd/banger-vsock-agent). It
// returns the process exit status; in init mode it never returns.
func Main(args []string) int {
	if isInitInvocation(args, os.Getpid()) {
		return runInit(args)
	}
	if len(args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		return 2
	}
	switch args[1] {
	case "version", "--version", "-version":
		fmt.Println(Version)
		return 0
	case "serve-fd", "supervise-fd":
		if len(args) != 3 {
			fmt.Fprint(os.Stderr, usage)
			return 2
		}
		fd, err := strconv.Atoi(args[2])
		if err != nil || fd < 0 {
			fmt.Fprintf(os.Stderr, "banger-agent: %s: bad file descriptor %q\n", args[1], args[2])
			return 2
		}
		f := os.NewFile(uintptr(fd), "agent-config")
		if f == nil {
			fmt.Fprintf(os.Stderr, "banger-agent: %s: bad file descriptor %d\n", args[1], fd)
			return 2
		}
		raw, err := io.ReadAll(io.LimitReader(f, 1<<20))
		f.Close()
		if err != nil {
			fmt.Fprintf(os.Stderr, "banger-agent: config from fd %d: %v\n", fd, err)
			return 1
		}
		cfg, err := readConfig(bytes.NewReader(raw))
		if err != nil {
			fmt.Fprintf(os.Stderr, "banger-agent: config from fd %d: %v\n", fd, err)
			return 1
		}
		if args[1] == "supervise-fd" {
			return supervise(raw)
		}
		return serve(cfg)
	case "serve":
		fs := flag.NewFlagSet("serve", flag.ContinueOnError)
		path := fs.String("config", agentproto.ConfigPath, "agent configuration file (agentproto.Config JSON)")
		if err := fs.Parse(args[2:]); err != nil {
			return 2
		}
		f, err := os.Open(*path)
		if err != nil {
			fmt.Fprintf(os.Stderr, "banger-agent: %v\n", err)
			return 1
		}
		cfg, err := readConfig(f)
		f.Close()
		if err != nil {
			fmt.Fprintf(os.Stderr, "banger-agent: config %s: %v\n", *path, err)
			return 1
		}
		return serve(cfg)
	case sftpServerCommand: // hidden: the built-in SSH server's sftp subsystem
		return serveSFTP()
	case "help", "-h", "--help":
		fmt.Print(usage)
		return 0
	default:
		fmt.Fprintf(os.Stderr, "banger-agent: unknown command %q\n%s", args[1], usage)
		return 2
	}
}

func readConfig(r io.Reader) (agentproto.Config, error) {
	var cfg agentproto.Config
	b, err := io.ReadAll(io.LimitReader(r, 1<<20))
	if err != nil {
		return cfg, fmt.Errorf("read: %w", err)
	}
	if err := json.Unmarshal(b, &cfg); err != nil {
		return cfg, fmt.Errorf("parse: %w", err)
	}
	return cfg, nil
}

// serve runs the agent server until SIGTERM or SIGINT. The init mode comes
// from the environment set by init mode (empty when started by hand).
func serve(cfg agentproto.Config) int {
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo})).With("component", "banger-agent")
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	mode, initPath := os.Getenv(envInitMode), os.Getenv(envInit)
	hooks := Hooks{Shutdown: shutdownHook(mode, log), InitMode: mode, Init: initPath, EarlyBootDone: newEarlyBootChecker(mode).check,
		NetworkError: os.Getenv(envNetworkError)}
	if os.Getenv(envMainFD) == strconv.Itoa(mainFD) {
		// The link to PID 1's main process supervisor; the commands the
		// agent runs must not inherit it.
		syscall.CloseOnExec(mainFD)
		if f := os.NewFile(mainFD, "main-link"); f != nil {
			hooks.Main = NewMainLink(f, log)
			go hooks.Main.Run(ctx)
		}
	}
	log.Info("agent serving", "version", Version, "transport", cfg.Transport, "init_mode", mode)
	go watchPowerButton(ctx, "/sys", "/dev", 2*time.Second, func() {
		if err := hooks.Shutdown(false); err != nil {
			log.Error("power off on the power button", "err", err)
		}
	}, log)
	if err := Serve(ctx, cfg, hooks, log); err != nil && !errors.Is(err, context.Canceled) {
		log.Error("agent stopped", "err", err)
		return 1
	}
	return 0
}
