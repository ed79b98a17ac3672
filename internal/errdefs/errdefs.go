// Package errdefs defines banger's error kinds. Packages wrap these sentinels
// with context (fmt.Errorf("vm %q: %w", name, errdefs.ErrNotFound)); the RPC
// edge maps them to wire codes and the client maps codes back, so
// errors.Is works on both sides of the socket.
package errdefs

import (
	"context"
	"errors"

	"github.com/bangerdev/banger/internal/api"
)

// Error kinds.
var (
	ErrInvalid            = errors.New("invalid argument")
	ErrNotFound           = errors.New("not found")
	ErrAlreadyExists      = errors.New("already exists")
	ErrFailedPrecondition = errors.New("failed precondition")
	ErrPermissionDenied   = errors.New("permission denied")
	ErrUnknownMethod      = errors.New("unknown method")
)

var kinds = []struct {
	err  error
	code string
}{
	{ErrInvalid, api.CodeInvalid},
	{ErrNotFound, api.CodeNotFound},
	{ErrAlreadyExists, api.CodeAlreadyExists},
	{ErrFailedPrecondition, api.CodeFailedPrecond},
	{ErrPermissionDenied, api.CodePermissionDenied},
	{ErrUnknownMethod, api.CodeUnknownMethod},
	{context.Canceled, api.CodeCanceled},
}

// Code returns the wire code of err.
func Code(err error) string {
	for _, k := range kinds {
		if errors.Is(err, k.err) {
			return k.code
		}
	}
	return api.CodeInternal
}

// FromCode returns the sentinel error of a wire code (nil for internal or
// unknown codes).
func FromCode(code string) error {
	for _, k := range kinds {
		if k.code == code {
			return k.err
		}
	}
	return nil
}
