package cli

import (
	"context"
	"fmt"
	"os/exec"

	"github.com/spf13/cobra"

	"github.com/bangerdev/banger/internal/config"
	"github.com/bangerdev/banger/internal/doctor"
	"github.com/bangerdev/banger/internal/imagecat"
)

func (a *app) doctorCmd() *cobra.Command {
	var stateDir string
	cmd := &cobra.Command{
		Use:   "doctor",
		Short: "Check whether this host can run banger VMs",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			dir := stateDir
			if dir == "" {
				dir = config.DefaultStateDir
				if p, err := a.client().Ping(cmd.Context()); err == nil && p.StateDir != "" {
					dir = p.StateDir
				}
			}
			opts := doctor.Options{
				StateDir:   dir,
				SocketPath: a.cfg.SocketPath,
				Ping: func(ctx context.Context) (string, error) {
					p, err := a.client().Ping(ctx)
					if err != nil {
						return "", err
					}
					return fmt.Sprintf("bangerd %s (api v%d, pid %d)", p.Version, p.APIVersion, p.PID), nil
				},
			}
			// bangerd's network, from its config file (defaults when it
			// can't be read: doctor checks the host, not the file).
			dc, err := config.LoadDaemon(config.DefaultDaemonConfigPath, false)
			if err == nil {
				opts.Bridge = dc.BridgeName
				opts.Subnet, _ = dc.SubnetPrefix()
			} else {
				dc = config.DefaultDaemon()
			}
			opts.DefaultImage = func(ctx context.Context) (doctor.DefaultImage, error) { return a.defaultImage(ctx, dc) }
			checks := doctor.Run(cmd.Context(), opts)
			checks = append(checks, a.sshChecks()...)
			for _, c := range checks {
				fmt.Fprintf(a.stdout, "%-4s  %-18s %s\n", c.Status, c.Name, c.Detail)
				if c.Fix != "" && c.Status != doctor.OK {
					fmt.Fprintf(a.stdout, "      %-18s fix: %s\n", "", c.Fix)
				}
			}
			if doctor.Summary(checks) == doctor.Fail {
				return exitError{1}
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&stateDir, "state-dir", "", "state directory to check (default: the daemon's, else /var/lib/banger)")
	return cmd
}

// defaultImage finds where vm run's default image comes from: the CLI's
// default_image_name, else the daemon's (asked, else from its config
// file); local if the daemon has it, else the catalog entry that has it.
func (a *app) defaultImage(ctx context.Context, dc config.Daemon) (doctor.DefaultImage, error) {
	name, catalogs := dc.DefaultImageName, dc.CatalogURLs
	p, pingErr := a.client().Ping(ctx)
	if pingErr == nil && p.DefaultImage != "" {
		name, catalogs = p.DefaultImage, p.CatalogURLs
	}
	if a.cfg.DefaultImageName != "" {
		name = a.cfg.DefaultImageName
	}
	im := doctor.DefaultImage{Name: name}
	if pingErr == nil {
		if _, err := a.client().ImageInspect(ctx, name); err == nil {
			im.Local = true
			return im, nil
		}
	}
	cat, err := imagecat.Builtin().Load(ctx, catalogs, nil)
	if err != nil {
		return im, err
	}
	im.Searched = cat.Sources()
	if e, err := cat.Resolve(name); err == nil {
		im.Entry, im.Build, im.URL = e.Ref(), e.Build, e.URL
	}
	return im, nil
}

// sshChecks are the user's side of SSH: the ssh client, banger's key,
// ssh NAME.banger (the Include in ~/.ssh/config).
func (a *app) sshChecks() []doctor.Check {
	var cs []doctor.Check
	if p, err := exec.LookPath("ssh"); err != nil {
		cs = append(cs, doctor.Check{Name: "ssh client", Status: doctor.Warn,
			Detail: "no ssh on PATH: vm ssh and ssh NAME.banger can't work; vm run opens the agent's terminal instead",
			Fix:    "install OpenSSH's client (apt-get install openssh-client)"})
	} else {
		cs = append(cs, doctor.Check{Name: "ssh client", Status: doctor.OK, Detail: p})
	}
	f, err := a.sshFiles()
	if err != nil {
		return append(cs, doctor.Check{Name: "ssh key", Status: doctor.Warn, Detail: err.Error(),
			Fix: "banger needs the invoking user's home for its ssh key (docs/ssh.md)"})
	}
	if detail, err := f.KeyInfo(); err != nil {
		cs = append(cs, doctor.Check{Name: "ssh key", Status: doctor.Warn, Detail: err.Error() + ": new VMs get no key",
			Fix: fmt.Sprintf("chmod 600 %s, or make the key: ssh-keygen -t ed25519 -f %s (or remove ssh_key_path from the config)", f.Key, f.Key)})
	} else {
		cs = append(cs, doctor.Check{Name: "ssh key", Status: doctor.OK, Detail: detail})
	}
	detail := "ssh NAME.banger works (~/.ssh/config includes banger's ssh config)"
	if !f.Installed() {
		detail = "ssh NAME.banger needs: banger ssh-config --install (banger vm ssh NAME works without)"
	}
	return append(cs, doctor.Check{Name: "ssh config", Status: doctor.OK, Detail: detail})
}
