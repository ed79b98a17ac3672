package cli

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/vmname"
)

func (a *app) imageCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "image", Short: "Pull, register, promote and manage images"}
	cmd.AddCommand(a.imagePullCmd(), a.imageRegisterCmd(), a.imagePromoteCmd(), a.imageLsCmd(), a.imageInspectCmd(), a.imageRmCmd(), a.imagePruneCmd())
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
		Use:   "register NAME --rootfs FILE --kernel FILE|KERNEL [--initrd FILE] [--modules DIR] [--user NAME]",
		Short: "Register host files as an unmanaged image (the files stay where they are)",
		Long: "Register host files as an unmanaged image (the files stay where they are).\n\n" +
			"--kernel is a kernel image file (with --initrd and --modules: banger registers a kernel object for them, shared with other images registered with the same files), " +
			"or the name of a kernel object (banger kernel ls) when no such file exists.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			p := api.ImageRegisterParams{Name: args[0], User: user}
			kernelFile := kernel
			if _, err := os.Stat(kernel); err != nil && isKernelName(kernel) {
				p.KernelName, kernelFile = kernel, ""
			}
			for _, x := range []struct {
				dst *string
				src string
			}{{&p.Rootfs, rootfs}, {&p.Kernel, kernelFile}, {&p.Initrd, initrd}, {&p.ModulesDir, modules}} {
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
	cmd.Flags().StringVar(&kernel, "kernel", "", "kernel image file (bzImage or vmlinux), or a kernel's name (banger kernel ls) (required)")
	cmd.Flags().StringVar(&initrd, "initrd", "", "initrd to boot with (banger appends its own archive)")
	cmd.Flags().StringVar(&modules, "modules", "", "kernel modules: a copy of /lib/modules/<release> (any name), or a directory holding <release>/ or lib/modules/<release>; checked against the kernel's release")
	cmd.Flags().StringVar(&user, "user", "", "the image's default user: vm ssh logs in as it and banger authorises your SSH key for it (default root)")
	_ = cmd.MarkFlagRequired("rootfs")
	_ = cmd.MarkFlagRequired("kernel")
	return cmd
}

// isKernelName reports whether s can be a kernel object's name (a DNS
// label that may hold dots: generic-6.1) rather than a path.
func isKernelName(s string) bool {
	return s != "" && !strings.Contains(s, "/") && !strings.HasSuffix(s, ".") && !strings.Contains(s, "..") &&
		vmname.ValidateKind("kernel", strings.ReplaceAll(s, ".", "-")) == nil
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
			fmt.Fprintln(tw, "NAME\tSOURCE\tVERSION\tKERNEL\tSIZE\tIN-USE\tDIGEST")
			for _, im := range ims {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%s\n", im.Name, sourceText(im.Source, im.Managed), dash(im.Version), dash(im.KernelName),
					humanBytes(im.SizeBytes), im.InUse, shortDigest(im.Digest))
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

// shortDigest is a digest as image ls shows it: the algorithm's 12 first
// hex digits ("sha256:0123456789ab").
func shortDigest(d string) string {
	algo, hex, ok := strings.Cut(d, ":")
	if !ok {
		algo, hex = "sha256", d
	}
	if hex == "" {
		return "-"
	}
	if len(hex) > 12 {
		hex = hex[:12]
	}
	return algo + ":" + hex
}

func (a *app) imagePruneCmd() *cobra.Command {
	var all bool
	cmd := &cobra.Command{
		Use:   "prune [--all]",
		Short: "Remove unused images and kernels pulled from catalogs or registries or built locally, and interrupted pulls",
		Long: "Remove the images and kernels no VM (or image) uses that banger can get again (pulled from a catalog or an OCI registry, or built locally), " +
			"and what interrupted pulls and builds left. With --all, also unused promoted images and imported kernels. " +
			"Registered images and kernels (files that stay where they are) are never removed.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			res, err := a.client().ImagePrune(cmd.Context(), api.PruneParams{All: all})
			if err != nil {
				return err
			}
			for _, n := range res.Images {
				fmt.Fprintf(a.stdout, "removed image %s\n", n)
			}
			for _, n := range res.Kernels {
				fmt.Fprintf(a.stdout, "removed kernel %s\n", n)
			}
			for _, n := range res.PartialFiles {
				fmt.Fprintf(a.stdout, "removed %s\n", n)
			}
			fmt.Fprintf(a.stdout, "reclaimed %s\n", humanBytes(res.ReclaimedBytes))
			return nil
		},
	}
	cmd.Flags().BoolVar(&all, "all", false, "also remove unused promoted images and imported kernels")
	return cmd
}
