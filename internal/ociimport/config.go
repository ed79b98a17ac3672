package ociimport

import (
	"slices"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/bangerdev/banger/internal/api"
)

// ConfigOf keeps what banger uses of an image's config: Env, WorkingDir,
// User, Entrypoint, Cmd, ExposedPorts (sorted, "80/tcp") and StopSignal.
// nil when the image has no config at all.
func ConfigOf(cfg *v1.ConfigFile) *api.ImageConfig {
	if cfg == nil {
		return nil
	}
	c := cfg.Config
	out := &api.ImageConfig{
		Env:        slices.Clone(c.Env),
		WorkingDir: c.WorkingDir,
		User:       c.User,
		Entrypoint: slices.Clone(c.Entrypoint),
		Cmd:        slices.Clone(c.Cmd),
		StopSignal: c.StopSignal,
	}
	for p := range c.ExposedPorts {
		out.ExposedPorts = append(out.ExposedPorts, p)
	}
	slices.Sort(out.ExposedPorts)
	return out
}
