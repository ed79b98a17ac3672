package main

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"time"

	"golang.org/x/crypto/chacha20poly1305"
	"golang.org/x/crypto/ssh"
)

// benchChunk is what each seal or channel write carries: the size of the
// agent's stream writes.
const benchChunk = 32 << 10

// cipherBench prints, one line each ("NAME MB/s"), how fast this CPU
// copies memory, seals with AES-128-GCM and ChaCha20-Poly1305 (32 KiB
// per seal), and carries an x/crypto/ssh channel over an in-process pipe
// with each cipher (both ends in this process: the writer seals, the
// reader opens). Each figure runs for d.
func cipherBench(d time.Duration) error {
	key := make([]byte, 32)
	rand.Read(key)
	block, err := aes.NewCipher(key[:16])
	if err != nil {
		return err
	}
	gcm, err := cipher.NewGCM(block)
	if err != nil {
		return err
	}
	chacha, err := chacha20poly1305.New(key)
	if err != nil {
		return err
	}
	src := make([]byte, benchChunk)
	dst := make([]byte, benchChunk)
	report := func(name string, n int64, el time.Duration) {
		fmt.Printf("%s %.1f MB/s\n", name, float64(n)/1e6/el.Seconds())
	}
	n, el := loop(d, func() { copy(dst, src) })
	report("memcpy", n, el)
	for _, a := range []struct {
		name string
		aead cipher.AEAD
	}{{"aes-128-gcm-seal", gcm}, {"chacha20-poly1305-seal", chacha}} {
		nonce := make([]byte, a.aead.NonceSize())
		out := make([]byte, 0, benchChunk+a.aead.Overhead())
		n, el := loop(d, func() { out = a.aead.Seal(out[:0], nonce, src, nil) })
		report(a.name, n, el)
	}
	for _, c := range []string{"aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com"} {
		n, el, err := sshChannel(c, d)
		if err != nil {
			return fmt.Errorf("ssh channel %s: %w", c, err)
		}
		report("ssh-channel-"+c, n, el)
	}
	return nil
}

// loop runs f, which handles benchChunk bytes, until d has passed, and
// returns the bytes handled and the time taken.
func loop(d time.Duration, f func()) (int64, time.Duration) {
	var n int64
	start := time.Now()
	for {
		for i := 0; i < 16; i++ {
			f()
			n += benchChunk
		}
		if el := time.Since(start); el >= d {
			return n, el
		}
	}
}

// sshChannel writes into an SSH channel using cipher for d, over a
// socket pair to a server in this process that discards what it reads, and
// returns the bytes the server read and the time until it read the last.
func sshChannel(cipherName string, d time.Duration) (int64, time.Duration, error) {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return 0, 0, err
	}
	signer, err := ssh.NewSignerFromKey(priv)
	if err != nil {
		return 0, 0, err
	}
	ciphers := []string{cipherName}
	scfg := &ssh.ServerConfig{NoClientAuth: true, Config: ssh.Config{Ciphers: ciphers}}
	scfg.AddHostKey(signer)
	cs, ss, err := socketPair()
	if err != nil {
		return 0, 0, err
	}
	defer cs.Close()
	defer ss.Close()
	type result struct {
		n   int64
		err error
	}
	got := make(chan result, 1)
	go func() {
		sconn, chans, reqs, err := ssh.NewServerConn(ss, scfg)
		if err != nil {
			got <- result{err: err}
			return
		}
		defer sconn.Close()
		go ssh.DiscardRequests(reqs)
		nc, ok := <-chans
		if !ok {
			got <- result{err: errors.New("no channel")}
			return
		}
		ch, creqs, err := nc.Accept()
		if err != nil {
			got <- result{err: err}
			return
		}
		go ssh.DiscardRequests(creqs)
		n, err := io.Copy(io.Discard, ch)
		got <- result{n, err}
	}()
	ccfg := &ssh.ClientConfig{
		User: "bench", Config: ssh.Config{Ciphers: ciphers},
		// Both ends are this process: there is no host to verify.
		HostKeyCallback: ssh.InsecureIgnoreHostKey(),
	}
	cconn, cchans, creqs, err := ssh.NewClientConn(cs, "pipe", ccfg)
	if err != nil {
		return 0, 0, err
	}
	client := ssh.NewClient(cconn, cchans, creqs)
	defer client.Close()
	ch, reqs, err := client.OpenChannel("bench", nil)
	if err != nil {
		return 0, 0, err
	}
	go ssh.DiscardRequests(reqs)
	buf := make([]byte, benchChunk)
	start := time.Now()
	for time.Since(start) < d {
		if _, err := ch.Write(buf); err != nil {
			return 0, 0, err
		}
	}
	if err := ch.CloseWrite(); err != nil {
		return 0, 0, err
	}
	r := <-got
	return r.n, time.Since(start), r.err
}

// socketPair returns both ends of a unix stream socket pair (net.Pipe
// would deadlock SSH's handshake: both ends write their version first).
func socketPair() (net.Conn, net.Conn, error) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, err
	}
	var conns [2]net.Conn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			if i == 1 {
				conns[0].Close()
			}
			return nil, nil, err
		}
		conns[i] = c
	}
	return conns[0], conns[1], nil
}
