package cli

import (
	"context"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/bangerdev/banger/internal/config"
	"github.com/bangerdev/banger/internal/doctor"
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
			checks := doctor.Run(cmd.Context(), doctor.Options{
				StateDir:   dir,
				SocketPath: a.cfg.SocketPath,
				Ping: func(ctx context.Context) (string, error) {
					p, err := a.client().Ping(ctx)
					if err != nil {
						return "", err
					}
					return fmt.Sprintf("bangerd %s (api v%d, pid %d)", p.Version, p.APIVersion, p.PID), nil
				},
			})
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
