package daemon

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/bundle"
	"github.com/bangerdev/banger/internal/catalog"
	"github.com/bangerdev/banger/internal/download"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/imagecat"
	"github.com/bangerdev/banger/internal/kernelcat"
	"github.com/bangerdev/banger/internal/ociimport"
	"github.com/bangerdev/banger/internal/rpc"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/undo"
)

// Pulls: image pull, kernel pull, and the pulls vm create starts when
// its image or kernel is not local (ensureImage, ensureKernel). Each runs
// in the registry of pullops.go, so it outlives its client and is shared.
//
// image pull REF: a catalog entry (NAME or NAME@VERSION) is installed
// from its bundle (after the kernel it names); if the bundle can't be
// fetched (no URL, a network error, a 404) and the entry has a build
// recipe, the image is built locally instead. Any other REF is an OCI
// reference (pullOCI). kernel pull NAME: the kernel catalog only.

// catalogTTL is how long loaded catalogs are reused: catalog_urls are
// read again at the first pull after it.
const catalogTTL = 30 * time.Second

// catalogCache holds the catalogs last loaded.
type catalogCache struct {
	mu      sync.Mutex
	at      time.Time
	images  *imagecat.Catalog
	kernels *kernelcat.Catalog
}

// catalogs returns the image and kernel catalogs: the embedded ones
// (unless embedded_catalogs = false) merged with catalog_urls, loaded at most every catalogTTL.
func (d *Daemon) catalogs(ctx context.Context) (*imagecat.Catalog, *kernelcat.Catalog, error) {
	c := &d.catalogCache
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.images != nil && time.Since(c.at) < catalogTTL {
		return c.images, c.kernels, nil
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	// One read of each URL for both kinds.
	read := map[string][]byte{}
	fetch := func(u string) ([]byte, error) {
		if b, ok := read[u]; ok {
			return b, nil
		}
		b, err := fetchCatalog(ctx, u)
		if err == nil {
			read[u] = b
		}
		return b, err
	}
	loadImages, loadKernels := imagecat.Builtin().Load, kernelcat.Builtin().Load
	if !d.cfg.EmbeddedCatalogs {
		loadImages, loadKernels = imagecat.Builtin().LoadURLs, kernelcat.Builtin().LoadURLs
	}
	ims, err := loadImages(ctx, d.cfg.CatalogURLs, fetch)
	if err != nil {
		return nil, nil, fmt.Errorf("load the image catalogs (catalog_urls): %w", err)
	}
	ks, err := loadKernels(ctx, d.cfg.CatalogURLs, fetch)
	if err != nil {
		return nil, nil, fmt.Errorf("load the kernel catalogs (catalog_urls): %w", err)
	}
	c.images, c.kernels, c.at = ims, ks, time.Now()
	return ims, ks, nil
}

// fetchCatalog reads a catalog over http(s) with the download rules
// (https, or http on loopback; timeouts), at most catalog.MaxCatalogSize.
func fetchCatalog(ctx context.Context, u string) ([]byte, error) {
	src, err := download.New(u, download.Options{Retries: 2})
	if err != nil {
		return nil, err
	}
	rc, err := src.Open(ctx, 0)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	b, err := io.ReadAll(io.LimitReader(rc, catalog.MaxCatalogSize+1))
	if err != nil {
		return nil, err
	}
	if len(b) > catalog.MaxCatalogSize {
		return nil, fmt.Errorf("larger than %d bytes: %w", catalog.MaxCatalogSize, errdefs.ErrInvalid)
	}
	return b, nil
}

func (d *Daemon) imagePull(ctx context.Context, call *rpc.Call) (any, error) {
	var p api.PullParams
	if err := call.Decode(&p); err != nil {
		return nil, err
	}
	im, err := d.pullImage(ctx, p, call.Progress)
	if err != nil {
		return nil, err
	}
	return d.imageAPI(ctx, im), nil
}

func (d *Daemon) kernelPull(ctx context.Context, call *rpc.Call) (any, error) {
	var p api.PullParams
	if err := call.Decode(&p); err != nil {
		return nil, err
	}
	if p.Platform != "" || p.Insecure || p.Kernel != "" {
		return nil, fmt.Errorf("kernel pull takes a kernel catalog name only (no platform, insecure or kernel): %w", errdefs.ErrInvalid)
	}
	if p.Ref == "" {
		return nil, fmt.Errorf("kernel pull: name a kernel of the catalog (banger kernel pull NAME): %w", errdefs.ErrInvalid)
	}
	_, kernels, err := d.catalogs(ctx)
	if err != nil {
		return nil, err
	}
	e, err := kernels.Resolve(p.Ref)
	if err != nil {
		return nil, err
	}
	name := p.Name
	if name == "" {
		name = e.Name
	}
	if k, err := d.store.GetKernel(ctx, name); err == nil {
		if k.Source == api.SourceCatalog && k.Version == e.Version {
			call.Progress(api.Progress{Phase: fmt.Sprintf("kernel %s %s is up to date", name, e.Version)})
			return d.kernelAPI(ctx, k), nil
		}
		return nil, fmt.Errorf("kernel %s exists (%s %s): remove it first (banger kernel rm %s) or pull with --name: %w",
			errdefs.Quote(name), sourceOr(k.Source), k.Version, name, errdefs.ErrAlreadyExists)
	}
	k, err := d.pullKernelEntry(ctx, e, name, p.Ref, call.Progress)
	if err != nil {
		return nil, err
	}
	return d.kernelAPI(ctx, k), nil
}

func (d *Daemon) pullCancel(ctx context.Context, call *rpc.Call) (any, error) {
	var p api.PullCancelParams
	if err := call.Decode(&p); err != nil {
		return nil, err
	}
	switch p.Kind {
	case "", "image":
		p.Kind = "image"
	case "kernel":
	default:
		return nil, fmt.Errorf("pull cancel: kind %s: want image or kernel: %w", errdefs.Quote(p.Kind), errdefs.ErrInvalid)
	}
	return nil, d.cancelPull(ctx, p.Kind, p.Ref)
}

func sourceOr(s string) string {
	if s == "" {
		return api.SourceRegistered
	}
	return s
}

// pullImage pulls an image: a catalog entry, else an OCI reference.
func (d *Daemon) pullImage(ctx context.Context, p api.PullParams, progress func(api.Progress)) (store.Image, error) {
	if p.Ref == "" {
		return store.Image{}, fmt.Errorf("image pull: name an image (a catalog name or an OCI reference): %w", errdefs.ErrInvalid)
	}
	images, _, err := d.catalogs(ctx)
	if err != nil {
		return store.Image{}, err
	}
	e, err := images.Resolve(p.Ref)
	switch {
	case err == nil:
	case isCatalogRef(images, p.Ref):
		// NAME@VERSION of a catalog name without that version.
		return store.Image{}, err
	default:
		return d.pullOCIShared(ctx, p, progress)
	}
	if p.Platform != "" || p.Insecure {
		return store.Image{}, fmt.Errorf("%s is a catalog image: --platform and --insecure apply to OCI references only: %w", errdefs.Quote(p.Ref), errdefs.ErrInvalid)
	}
	if p.Kernel != "" {
		return store.Image{}, fmt.Errorf("%s is a catalog image: it boots the kernel its catalog names (vm create --kernel overrides it per VM): %w", errdefs.Quote(p.Ref), errdefs.ErrInvalid)
	}
	name := p.Name
	if name == "" {
		name = e.Name
	}
	if im, err := d.store.GetImage(ctx, name); err == nil {
		if im.Source == api.SourceCatalog && im.Version == e.Version || im.Source == api.SourceLocalBuild && im.Version == e.Version {
			progress(api.Progress{Phase: fmt.Sprintf("image %s %s is up to date", name, e.Version)})
			return im, nil
		}
		return store.Image{}, fmt.Errorf("image %s exists (%s %s): remove it first (banger image rm %s) or pull with --name: %w",
			errdefs.Quote(name), sourceOr(im.Source), im.Version, name, errdefs.ErrAlreadyExists)
	}
	return d.pullImageEntry(ctx, e, name, p.Ref, progress)
}

// isCatalogRef reports whether ref is NAME@VERSION of a name the catalog
// has (a version it lacks: an error, not an OCI reference).
func isCatalogRef(c *catalog.Catalog, ref string) bool {
	name, version, ok := strings.Cut(ref, "@")
	return ok && !strings.Contains(version, ":") && c.Has(name)
}

// pullImageEntry pulls a catalog image as name, sharing a running pull
// of the same entry and name.
func (d *Daemon) pullImageEntry(ctx context.Context, e imagecat.Entry, name, asked string, progress func(api.Progress)) (store.Image, error) {
	op := d.pulls.start(d.ctx, "image", "image:"+e.Ref()+">"+name, []string{asked, name, e.Ref()}, func(ctx context.Context, progress func(api.Progress)) (any, error) {
		return d.installCatalogImage(ctx, e, name, progress)
	})
	res, err := op.watch(ctx, progress)
	if err != nil {
		return store.Image{}, err
	}
	return res.(store.Image), nil
}

// pullKernelEntry pulls a catalog kernel as name, sharing a running pull
// of the same entry and name.
func (d *Daemon) pullKernelEntry(ctx context.Context, e kernelcat.Entry, name, asked string, progress func(api.Progress)) (store.Kernel, error) {
	op := d.pulls.start(d.ctx, "kernel", "kernel:"+e.Ref()+">"+name, []string{asked, name, e.Ref()}, func(ctx context.Context, progress func(api.Progress)) (any, error) {
		return d.installCatalogKernel(ctx, e, name, progress)
	})
	res, err := op.watch(ctx, progress)
	if err != nil {
		return store.Kernel{}, err
	}
	return res.(store.Kernel), nil
}

// pullOCIShared runs pullOCI in the registry (one pull per reference,
// platform and name).
func (d *Daemon) pullOCIShared(ctx context.Context, p api.PullParams, progress func(api.Progress)) (store.Image, error) {
	// One key for the spellings of a reference (nginx, docker.io/library/
	// nginx:latest): they pull the same image.
	ref := p.Ref
	if r, ok := ociimport.RecordedRef(ref); ok {
		ref = r
	}
	key := "image:oci:" + ref + ">" + p.Name + "/" + p.Platform + "/" + p.Kernel
	refs := []string{p.Ref}
	if p.Name != "" {
		refs = append(refs, p.Name)
	}
	op := d.pulls.start(d.ctx, "image", key, refs, func(ctx context.Context, progress func(api.Progress)) (any, error) {
		return d.pullOCI(ctx, p, progress)
	})
	res, err := op.watch(ctx, progress)
	if err != nil {
		return store.Image{}, err
	}
	return res.(store.Image), nil
}

// bundleProgress reports a bundle's download as phase: at most 10 frames
// a second, the latest always sent (a download that stalls shows where it
// stopped). stop sends what is pending and ends the reports.
func bundleProgress(phase string, progress func(api.Progress)) (update func(done, total int64), stop func()) {
	const every = 100 * time.Millisecond
	var (
		mu            sync.Mutex
		last          time.Time
		sent          = int64(-1)
		pending, size int64
		timer         *time.Timer
		stopped       bool
	)
	flush := func() { // with mu held
		if pending > sent && !stopped {
			progress(api.Progress{Phase: phase, Done: pending, Total: max(size, 0), Unit: "bytes"})
			sent, last = pending, time.Now()
		}
	}
	update = func(done, total int64) {
		mu.Lock()
		defer mu.Unlock()
		pending, size = done, total
		if wait := every - time.Since(last); wait <= 0 || done == total {
			flush()
		} else if timer == nil {
			timer = time.AfterFunc(wait, func() {
				mu.Lock()
				defer mu.Unlock()
				timer = nil
				flush()
			})
		}
	}
	stop = func() {
		mu.Lock()
		defer mu.Unlock()
		flush()
		stopped = true
		if timer != nil {
			timer.Stop()
		}
	}
	return update, stop
}

// installCatalogImage makes the image of a catalog entry: its kernel
// first, then its bundle, or a local build when the bundle can't be had
// and the entry has a recipe.
func (d *Daemon) installCatalogImage(ctx context.Context, e imagecat.Entry, name string, progress func(api.Progress)) (store.Image, error) {
	kref := e.Kernel
	if kref == "" {
		kref = d.cfg.DefaultKernelName
	}
	k, err := d.ensureKernel(ctx, kref, progress)
	if err != nil {
		return store.Image{}, fmt.Errorf("pull image %s: its kernel: %w", e.Ref(), err)
	}
	build := func() (store.Image, error) { return d.buildImageLocally(ctx, e, name, progress) }
	return installFromCatalog(ctx, d, bundle.KindImage, e, name, progress, build, func(dir string, m *bundle.Manifest) (store.Image, error) {
		rootfs := m.File(bundle.RoleRootfs)
		user := m.User
		if user == "" {
			user = e.User
		}
		return d.installImage(ctx, stagedImage{
			Name: name, Source: api.SourceCatalog, Version: e.Version, Ref: e.URL, Digest: "sha256:" + e.SHA256,
			Dir: dir, Rootfs: filepath.Join(dir, filepath.FromSlash(rootfs.Path)), KernelID: k.ID, User: user,
			Config: m.Config, SHA256: manifestSums(m),
		})
	})
}

// installCatalogKernel makes the kernel of a catalog entry from its
// bundle, or a local build when the bundle can't be had and the entry
// has a recipe.
func (d *Daemon) installCatalogKernel(ctx context.Context, e kernelcat.Entry, name string, progress func(api.Progress)) (store.Kernel, error) {
	build := func() (store.Kernel, error) { return d.buildKernelLocally(ctx, e, name, progress) }
	return installFromCatalog(ctx, d, bundle.KindKernel, e, name, progress, build, func(dir string, m *bundle.Manifest) (store.Kernel, error) {
		sk := stagedKernel{
			Name: name, Source: api.SourceCatalog, Version: e.Version, Ref: e.URL, Digest: "sha256:" + e.SHA256,
			Release: m.Release, Dir: dir, SHA256: manifestSums(m),
		}
		sk.Kernel = filepath.Join(dir, filepath.FromSlash(m.File(bundle.RoleKernel).Path))
		if f := m.File(bundle.RoleInitrd); f != nil {
			sk.Initrd = filepath.Join(dir, filepath.FromSlash(f.Path))
		}
		if f := m.File(bundle.RoleModules); f != nil {
			// The modules tree is the top directory of the modules files
			// ("modules/lib/modules/<release>/...": "modules").
			top, _, _ := strings.Cut(f.Path, "/")
			for _, o := range m.Files {
				if o.Role == bundle.RoleModules && !strings.HasPrefix(o.Path, top+"/") {
					d.discardStaging(dir)
					return store.Kernel{}, fmt.Errorf("kernel bundle %s: the modules files are not under one directory (%s, %s): %w", e.Ref(), f.Path, o.Path, errdefs.ErrInvalid)
				}
			}
			sk.ModulesDir = filepath.Join(dir, top)
		}
		return d.installKernel(ctx, sk)
	})
}

// installFromCatalog is the part of a catalog pull that images and
// kernels share: the entry's bundle is fetched into its staging directory
// (keyed by the bundle, so a pull that failed on the network leaves its
// checkpoint there and the next one resumes from it) and handed to
// install, which owns the directory from then on; build runs instead when
// the entry has no bundle, or when its bundle can't be had at all and the
// entry has a recipe.
func installFromCatalog[T any](ctx context.Context, d *Daemon, kind string, e catalog.Entry, name string, progress func(api.Progress),
	build func() (T, error), install func(dir string, m *bundle.Manifest) (T, error)) (out T, err error) {
	if e.URL == "" {
		progress(api.Progress{Phase: fmt.Sprintf("%s %s has no prebuilt bundle: building it locally (%s)", kind, e.Ref(), e.Build)})
		return build()
	}
	dir, err := d.bundleStagingDir(kind, e.SHA256)
	if err != nil {
		return out, err
	}
	keep := false
	steps := undo.New(d.log.With("op", "pull "+kind, kind, name))
	steps.Push("remove the staging directory", func(context.Context) error {
		if keep {
			d.keepStaging(dir)
		} else {
			d.discardStaging(dir)
		}
		return nil
	})
	defer func() {
		if err != nil {
			_ = steps.Run(context.WithoutCancel(ctx))
		}
	}()
	m, unavailable, err := d.fetchBundle(ctx, e, kind, dir, progress)
	if err != nil {
		// Kept for a resume after a network failure; not after a cancel
		// or a bundle that doesn't match its sums.
		keep = ctx.Err() == nil && errors.Is(err, download.ErrUnreachable) && !unavailable
		if e.Build != "" && unavailable {
			_ = steps.Run(context.WithoutCancel(ctx))
			d.log.Warn(kind+" bundle unavailable: building locally", kind, e.Ref(), "url", e.URL, "recipe", e.Build, "err", err)
			progress(api.Progress{Phase: fmt.Sprintf("bundle unavailable (%v): building %s locally (%s)", err, e.Ref(), e.Build)})
			out, berr := build()
			if berr != nil {
				return out, fmt.Errorf("%w (after the bundle was unavailable: %w)", berr, err)
			}
			return out, nil
		}
		return out, err
	}
	progress(api.Progress{Phase: "install " + kind + " " + name})
	steps.Release() // install owns the staging directory now
	return install(dir, m)
}

// fetchBundle installs the bundle of e into dir: streamed from its URL,
// every file's size and sha256 checked against the manifest, the bundle's
// own sha256 against the catalog's.
//
// unavailable reports that the bundle could not be had at all (no
// connection, 404, no such file: download.ErrUnreachable before any byte
// arrived, in this pull or an earlier one whose staging dir it resumes): only then may the caller build the entry locally instead. A
// download that failed after bytes arrived is an error of the pull, not
// a reason to start a local build over.
func (d *Daemon) fetchBundle(ctx context.Context, e catalog.Entry, kind, dir string, progress func(api.Progress)) (m *bundle.Manifest, unavailable bool, err error) {
	src, err := download.New(e.URL, download.Options{Size: e.Size, Log: d.log.With("op", "download", kind, e.Ref())})
	if err != nil {
		return nil, false, fmt.Errorf("%s %s: %w", kind, e.Ref(), err)
	}
	start := time.Now()
	update, stop := bundleProgress(fmt.Sprintf("download %s %s", kind, e.Ref()), progress)
	var received atomic.Bool
	if ents, _ := os.ReadDir(dir); len(ents) > 0 {
		received.Store(true) // resuming: bytes arrived before
	}
	m, err = bundle.Install(ctx, src, dir, bundle.InstallOptions{
		Kind: kind, Name: e.Name, Version: e.Version, SHA256: e.SHA256, Progress: func(done, total int64) {
			if done > 0 {
				received.Store(true)
			}
			update(done, total)
		},
	})
	stop()
	if err != nil {
		if ctx.Err() != nil {
			return nil, false, fmt.Errorf("pull %s %s: %w", kind, e.Ref(), context.Cause(ctx))
		}
		unavailable = errors.Is(err, download.ErrUnreachable) && !received.Load()
		return nil, unavailable, fmt.Errorf("pull %s %s from %s: %w", kind, e.Ref(), e.URL, err)
	}
	secs := time.Since(start).Seconds()
	d.log.Info("bundle installed", "kind", kind, "entry", e.Ref(), "bytes", e.Size, "seconds", fmt.Sprintf("%.1f", secs),
		"mb_per_s", fmt.Sprintf("%.1f", float64(e.Size)/1e6/max(secs, 1e-3)))
	return m, false, nil
}

// manifestSums maps the files of a manifest (paths relative to the
// install dir) to their sha256.
func manifestSums(m *bundle.Manifest) map[string]string {
	sums := make(map[string]string, len(m.Files))
	for _, f := range m.Files {
		sums[filepath.FromSlash(path.Clean(f.Path))] = f.SHA256
	}
	return sums
}

// ensureImage returns the local image ref (a name or id), pulling it
// first when it is not local: from the image catalog, or, for an
// explicit OCI reference (with a registry, tag or digest), from its
// registry. Not found only when it is neither.
//
// admin: the caller may call admin methods (root); only then is a local
// OCI source (a path, oci:DIR, docker-archive:, docker-daemon:) imported,
// as image pull would.
func (d *Daemon) ensureImage(ctx context.Context, ref string, admin bool, progress func(api.Progress)) (store.Image, error) {
	im, err := d.store.GetImage(ctx, ref)
	if !errors.Is(err, errdefs.ErrNotFound) {
		return im, err
	}
	images, _, err := d.catalogs(ctx)
	if err != nil {
		return im, fmt.Errorf("image %s is not local, and the catalogs can't be read: %w", errdefs.Quote(ref), err)
	}
	if e, err := images.Resolve(ref); err == nil {
		name, _, _ := strings.Cut(ref, "@")
		if im, err := d.store.GetImage(ctx, name); err == nil {
			// NAME@VERSION whose NAME is local.
			if im.Version != e.Version {
				return im, fmt.Errorf("image %s is local at version %s, not %s: remove it first (banger image rm %s) to pull that one: %w",
					errdefs.Quote(name), im.Version, e.Version, name, errdefs.ErrFailedPrecondition)
			}
			return im, nil
		}
		progress(api.Progress{Phase: fmt.Sprintf("image %s is not local: pulling %s from the catalog", name, e.Ref())})
		return d.pullImageEntry(ctx, e, name, ref, progress)
	}
	if ociimport.IsLocalRef(ref) && admin {
		progress(api.Progress{Phase: fmt.Sprintf("image %s is not local: importing it", ref)})
		return d.pullOCIShared(ctx, api.PullParams{Ref: ref}, progress)
	}
	if ociimport.IsLocalRef(ref) {
		// bangerd would read it as root: admins only.
		return im, fmt.Errorf("image %s is a local OCI source: vm create does not import those (bangerd reads them as root); import it first with sudo banger image pull %s: %w",
			errdefs.Quote(ref), ref, errdefs.ErrPermissionDenied)
	}
	if isOCIRef(ref) {
		if im, ok, err := d.imageByRef(ctx, ref); err != nil || ok {
			return im, err
		}
		progress(api.Progress{Phase: fmt.Sprintf("image %s is not local: pulling it from its registry", ref)})
		return d.pullOCIShared(ctx, api.PullParams{Ref: ref}, progress)
	}
	notFound := fmt.Sprintf("image %s not found: it is not local (banger image ls) and not in the catalogs searched (%s)",
		errdefs.Quote(ref), strings.Join(images.Sources(), ", "))
	if !d.cfg.RegistryFallback {
		return im, fmt.Errorf("%s (registry_fallback = false: a bare name is not pulled from Docker Hub); "+
			"pull an OCI image with banger image pull REF, or register one with banger image register: %w", notFound, errdefs.ErrNotFound)
	}
	// A bare name (nginx) is an image of Docker Hub's library, as for
	// docker run: pulled when the catalogs don't have it.
	if im, ok, err := d.imageByRef(ctx, ref); err != nil || ok {
		return im, err
	}
	progress(api.Progress{Phase: fmt.Sprintf("image %s is neither local nor in a catalog: pulling it from Docker Hub", ref)})
	im, err = d.pullOCIShared(ctx, api.PullParams{Ref: ref}, progress)
	if err != nil {
		if ctx.Err() != nil || errors.Is(err, context.Canceled) {
			return im, err
		}
		return im, fmt.Errorf("%s, and the registry pull of it failed (%v); "+
			"pull an OCI image with banger image pull REF, or register one with banger image register: %w", notFound, err, errdefs.ErrNotFound)
	}
	return im, nil
}

// isOCIRef reports whether ref is explicitly an OCI reference: it has a
// registry or path ('/'), a tag (':') or a digest ('@'). A bare name is
// pulled from Docker Hub only after the catalogs (registry_fallback).
//
// Local sources (a path, oci:DIR, docker-archive:, docker-daemon:) are
// not: bangerd reads them as root, and vm create is not an admin method
// (image pull, which is, takes them).
func isOCIRef(ref string) bool { return strings.ContainsAny(ref, "/:@") && !ociimport.IsLocalRef(ref) }

// imageByRef finds the image pulled from an OCI reference.
func (d *Daemon) imageByRef(ctx context.Context, ref string) (store.Image, bool, error) {
	ims, err := d.store.ListImages(ctx)
	if err != nil {
		return store.Image{}, false, err
	}
	// An import records the canonical reference: nginx:1.27 is
	// docker.io/library/nginx:1.27.
	recorded, _ := ociimport.RecordedRef(ref)
	for _, im := range ims {
		if im.Source == api.SourceOCI && (im.Ref == ref || im.Ref == recorded) {
			return im, true, nil
		}
	}
	return store.Image{}, false, nil
}

// ensureKernel returns the local kernel ref (NAME, NAME@VERSION or an
// id), pulling it from the kernel catalog first when it is not local.
func (d *Daemon) ensureKernel(ctx context.Context, ref string, progress func(api.Progress)) (store.Kernel, error) {
	name, version, pinned := strings.Cut(ref, "@")
	k, err := d.store.GetKernel(ctx, name)
	if err == nil && pinned && k.Version != version {
		// NAME@VERSION whose NAME is local at another version (as
		// ensureImage).
		return k, fmt.Errorf("kernel %s is local at version %s, not %s: remove it first (banger kernel rm %s) to pull that one: %w",
			errdefs.Quote(name), cmp.Or(k.Version, "(none)"), version, name, errdefs.ErrFailedPrecondition)
	}
	if !errors.Is(err, errdefs.ErrNotFound) {
		return k, err
	}
	_, kernels, err := d.catalogs(ctx)
	if err != nil {
		return k, fmt.Errorf("kernel %s is not local, and the catalogs can't be read: %w", errdefs.Quote(ref), err)
	}
	e, err := kernels.Resolve(ref)
	if err != nil {
		if kernels.Has(name) {
			return k, err // NAME@VERSION: the versions the catalogs have
		}
		return k, fmt.Errorf("kernel %s not found: it is not local (banger kernel ls) and not in the catalogs searched (%s); import one with banger kernel import: %w",
			errdefs.Quote(ref), strings.Join(kernels.Sources(), ", "), errdefs.ErrNotFound)
	}
	progress(api.Progress{Phase: fmt.Sprintf("kernel %s is not local: pulling %s from the catalog", name, e.Ref())})
	return d.pullKernelEntry(ctx, e, name, ref, progress)
}
