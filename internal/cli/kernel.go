package cli

import (
	"fmt"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/bangerdev/banger/internal/api"
)

func (a *app) kernelCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "kernel", Short: "Pull, import and manage kernels (shared by images)"}
	cmd.AddCommand(a.kernelPullCmd(), a.kernelLsCmd(), a.kernelInspectCmd(), a.kernelRmCmd(), a.kernelImportCmd())
	return cmd
}

func (a *app) kernelLsCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List kernels",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ks, err := a.client().KernelList(cmd.Context())
			if err != nil {
				return err
			}
			if asJSON {
				return writeJSON(a.stdout, ks)
			}
			tw := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tSOURCE\tVERSION\tRELEASE\tSIZE\tIMAGES\tVMS")
			for _, k := range ks {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\n", k.Name, sourceText(k.Source, k.Managed), dash(k.Version), dash(k.Release),
					humanBytes(k.SizeBytes), dash(strings.Join(k.Images, ",")), len(k.VMs))
			}
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

// sourceText is a source as image ls and kernel ls show it: a
// registered object banger copied (promote) is "promoted".
func sourceText(source string, managed bool) string {
	if source == api.SourceRegistered && managed {
		return "promoted"
	}
	return dash(source)
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func (a *app) kernelInspectCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "inspect NAME",
		Short: "Show a kernel as JSON",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			k, err := a.client().KernelInspect(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			return writeJSON(a.stdout, k)
		},
	}
}

func (a *app) kernelRmCmd() *cobra.Command {
	return &cobra.Command{
		Use:     "rm NAME...",
		Aliases: []string{"remove"},
		Short:   "Remove kernels (refused while an image or a VM uses them)",
		Args:    cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.forEach(args, func(n string) error { return a.client().KernelRemove(cmd.Context(), n) })
		},
	}
}

func (a *app) kernelImportCmd() *cobra.Command {
	var deb, kernel, initrd, modules string
	cmd := &cobra.Command{
		Use:   "import NAME (--deb FILE | --kernel FILE [--initrd FILE] [--modules DIR])",
		Short: "Copy a kernel into banger's storage: a kernel image (bzImage or vmlinux) with optional initrd and modules, or a Debian kernel package (.deb)",
		Long: "Copy a kernel into banger's storage, as a kernel object images can name (image register --kernel NAME) and VMs boot (vm create --kernel NAME).\n\n" +
			"--deb takes a Debian kernel package (linux-image-*.deb, e.g. from apt-get download linux-image-cloud-amd64's dependency): banger extracts its kernel and modules and writes the module index its initramfs needs.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if (deb == "") == (kernel == "") {
				return fmt.Errorf("give --deb FILE or --kernel FILE")
			}
			if deb != "" && (initrd != "" || modules != "") {
				return fmt.Errorf("--initrd and --modules go with --kernel, not --deb")
			}
			p := api.KernelImportParams{Name: args[0]}
			for _, x := range []struct {
				dst *string
				src string
			}{{&p.Deb, deb}, {&p.Kernel, kernel}, {&p.Initrd, initrd}, {&p.ModulesDir, modules}} {
				v, err := absPath(x.src)
				if err != nil {
					return err
				}
				*x.dst = v
			}
			pr := a.progress()
			k, err := a.client().KernelImport(cmd.Context(), p, pr.update)
			pr.done()
			if err != nil {
				return err
			}
			fmt.Fprintf(a.stdout, "%s (release %s)\n", k.Name, dash(k.Release))
			return nil
		},
	}
	cmd.Flags().StringVar(&deb, "deb", "", "a Debian kernel package (linux-image-*.deb)")
	cmd.Flags().StringVar(&kernel, "kernel", "", "a kernel image (bzImage or ELF vmlinux)")
	cmd.Flags().StringVar(&initrd, "initrd", "", "an initrd to boot with (banger appends its own archive)")
	cmd.Flags().StringVar(&modules, "modules", "", "the kernel's modules: a copy of /lib/modules/<release> (depmod'ed), or a directory holding <release>/ or lib/modules/<release>")
	return cmd
}
