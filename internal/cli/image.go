package cli

import (
	"fmt"
	"path/filepath"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/bangerdev/banger/internal/api"
)

func (a *app) imageCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "image", Short: "Register, promote and manage images"}
	cmd.AddCommand(a.imageRegisterCmd(), a.imagePromoteCmd(), a.imageLsCmd(), a.imageInspectCmd(), a.imageRmCmd())
	cmd.AddCommand(a.imageBundleCmd())
	return cmd
}

// absPath makes a user-given path absolute (the daemon has another cwd).
func absPath(p string) (string, error) {
	if p == "" {
		return "", nil
	}
	return filepath.Abs(p)
}

func (a *app) imageRegisterCmd() *cobra.Command {
	var rootfs, kernel, initrd, modules, user string
	cmd := &cobra.Command{
		Use:   "register NAME --rootfs FILE --kernel FILE [--initrd FILE] [--modules DIR] [--user NAME]",
		Short: "Register host files as an unmanaged image (the files stay where they are)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			p := api.ImageRegisterParams{Name: args[0], User: user}
			for _, x := range []struct {
				dst *string
				src string
			}{{&p.Rootfs, rootfs}, {&p.Kernel, kernel}, {&p.Initrd, initrd}, {&p.ModulesDir, modules}} {
				v, err := absPath(x.src)
				if err != nil {
					return err
				}
				*x.dst = v
			}
			im, err := a.client().ImageRegister(cmd.Context(), p)
			if err != nil {
				return err
			}
			fmt.Fprintln(a.stdout, im.Name)
			return nil
		},
	}
	cmd.Flags().StringVar(&rootfs, "rootfs", "", "raw root filesystem image (required)")
	cmd.Flags().StringVar(&kernel, "kernel", "", "kernel (bzImage) (required)")
	cmd.Flags().StringVar(&initrd, "initrd", "", "initrd to boot with (banger appends its own archive)")
	cmd.Flags().StringVar(&modules, "modules", "", "kernel modules: a copy of /lib/modules/<release> (any name), or a directory holding <release>/ or lib/modules/<release>; checked against the kernel's release")
	cmd.Flags().StringVar(&user, "user", "", "the image's default user: vm ssh logs in as it and banger authorises your SSH key for it (default root)")
	_ = cmd.MarkFlagRequired("rootfs")
	_ = cmd.MarkFlagRequired("kernel")
	return cmd
}

func (a *app) imagePromoteCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "promote NAME",
		Short: "Copy an unmanaged image's files into daemon-owned storage",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			pr := a.progress()
			im, err := a.client().ImagePromote(cmd.Context(), args[0], pr.update)
			pr.done()
			if err != nil {
				return err
			}
			fmt.Fprintln(a.stdout, im.Name)
			return nil
		},
	}
}

func (a *app) imageLsCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List images",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ims, err := a.client().ImageList(cmd.Context())
			if err != nil {
				return err
			}
			if asJSON {
				return writeJSON(a.stdout, ims)
			}
			tw := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tMANAGED\tSIZE\tVMS\tROOTFS")
			for _, im := range ims {
				fmt.Fprintf(tw, "%s\t%v\t%s\t%d\t%s\n", im.Name, im.Managed, humanBytes(im.SizeBytes), len(im.UsedBy), im.Rootfs)
			}
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func (a *app) imageInspectCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "inspect NAME",
		Short: "Show an image as JSON",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			im, err := a.client().ImageInspect(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			return writeJSON(a.stdout, im)
		},
	}
}

func (a *app) imageRmCmd() *cobra.Command {
	return &cobra.Command{
		Use:     "rm NAME...",
		Aliases: []string{"remove"},
		Short:   "Remove images (refused while a VM uses them)",
		Args:    cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.forEach(args, func(n string) error { return a.client().ImageRemove(cmd.Context(), n) })
		},
	}
}
