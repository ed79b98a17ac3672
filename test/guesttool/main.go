// Command guesttool is the network end of the e2e tests and benchmarks
// inside a guest: a static binary (CGO_ENABLED=0) copied into any image
// with `banger vm cp`, since the test images have no nc or python.
//
//	guesttool serve [-d] tcp|udp PORT   answer each TCP connection (after
//	                                    its EOF) or datagram with "PROTO:" + what came
//	guesttool sink [-d] PORT            count a TCP connection's bytes, answer the count
//	guesttool dial [-src IP] [-t SEC] tcp|udp ADDR MSG
//	                                    send MSG, print the answer; exit 1 on failure
//	guesttool get [-src IP] [-t SEC] ADDR
//	                                    HTTP GET http://ADDR/, print the body
//	guesttool lookup NAME               resolve NAME through /etc/resolv.conf
//	guesttool addrs                     print "IFACE MAC ADDR/LEN" per address
//	guesttool cipherbench [-t SEC]      print "NAME MB/s" for memcpy, AES-128-GCM and
//	                                    ChaCha20-Poly1305 seals, and an SSH channel over an
//	                                    in-process pipe with each cipher (-t: seconds each)
//
// -d detaches: the server runs in a session of its own, with no output,
// and the command returns once it listens.
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fail(fmt.Errorf("usage: guesttool serve|sink|dial|get|lookup|addrs|cipherbench ARGS"))
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	detach := fs.Bool("d", false, "detach once listening")
	src := fs.String("src", "", "source address")
	secs := fs.Int("t", 5, "timeout in seconds")
	_ = fs.Parse(os.Args[2:])
	args := fs.Args()
	timeout := time.Duration(*secs) * time.Second
	var err error
	switch os.Args[1] {
	case "serve", "sink":
		err = server(os.Args[1], *detach, args)
	case "dial":
		if len(args) != 3 {
			fail(fmt.Errorf("usage: guesttool dial [-src IP] [-t SEC] tcp|udp ADDR MSG"))
		}
		err = dial(args[0], *src, args[1], args[2], timeout)
	case "get":
		if len(args) != 1 {
			fail(fmt.Errorf("usage: guesttool get [-src IP] [-t SEC] ADDR"))
		}
		err = get(*src, args[0], timeout)
	case "lookup":
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		var addrs []string
		if addrs, err = net.DefaultResolver.LookupHost(ctx, args[0]); err == nil {
			for _, a := range addrs {
				fmt.Println(a)
			}
		}
	case "addrs":
		err = addrs()
	case "cipherbench":
		err = cipherBench(timeout)
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fail(err)
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "guesttool:", err)
	os.Exit(1)
}

func server(cmd string, detach bool, args []string) error {
	proto, port := "tcp", ""
	switch {
	case cmd == "serve" && len(args) == 2:
		proto, port = args[0], args[1]
	case cmd == "sink" && len(args) == 1:
		port = args[0]
	default:
		return fmt.Errorf("usage: guesttool serve [-d] tcp|udp PORT | sink [-d] PORT")
	}
	if detach {
		// The child listens, then closes its stdout: the parent returns
		// once it read EOF, so the port is open when this command exits.
		c := exec.Command(os.Args[0], append([]string{cmd}, args...)...)
		r, w, err := os.Pipe()
		if err != nil {
			return err
		}
		c.Stdout = w
		c.Env = append(os.Environ(), "GUESTTOOL_READY_FD=1")
		c.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
		if err := c.Start(); err != nil {
			return err
		}
		w.Close()
		b, _ := io.ReadAll(r)
		if string(b) != "ready\n" {
			return fmt.Errorf("server did not start: %q", b)
		}
		return nil
	}
	ready := func() {
		if os.Getenv("GUESTTOOL_READY_FD") != "" {
			fmt.Println("ready")
			devnull, _ := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
			syscall.Dup2(int(devnull.Fd()), 1)
			syscall.Dup2(int(devnull.Fd()), 2)
		}
	}
	if proto == "udp" {
		pc, err := net.ListenPacket("udp", ":"+port)
		if err != nil {
			return err
		}
		ready()
		buf := make([]byte, 65536)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return err
			}
			pc.WriteTo(append([]byte("udp:"), buf[:n]...), from)
		}
	}
	ln, err := net.Listen("tcp", ":"+port)
	if err != nil {
		return err
	}
	ready()
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go func() {
			defer c.Close()
			if cmd == "sink" {
				n, _ := io.Copy(io.Discard, c)
				fmt.Fprintf(c, "%d\n", n)
				return
			}
			c.SetDeadline(time.Now().Add(30 * time.Second))
			b, _ := io.ReadAll(io.LimitReader(c, 1<<20))
			c.Write(append([]byte("tcp:"), b...))
		}()
	}
}

func dialer(network, src string, timeout time.Duration) *net.Dialer {
	d := &net.Dialer{Timeout: timeout}
	if src != "" {
		ip := net.ParseIP(src)
		if network == "udp" {
			d.LocalAddr = &net.UDPAddr{IP: ip}
		} else {
			d.LocalAddr = &net.TCPAddr{IP: ip}
		}
	}
	return d
}

func dial(network, src, addr, msg string, timeout time.Duration) error {
	c, err := dialer(network, src, timeout).Dial(network, addr)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := io.WriteString(c, msg); err != nil {
		return err
	}
	if network == "udp" {
		buf := make([]byte, 65536)
		n, err := c.Read(buf)
		if err != nil {
			return err
		}
		os.Stdout.Write(buf[:n])
		return nil
	}
	c.(*net.TCPConn).CloseWrite()
	b, err := io.ReadAll(c)
	os.Stdout.Write(b)
	if err == nil && len(b) == 0 {
		err = fmt.Errorf("%s closed without an answer", addr)
	}
	return err
}

func get(src, addr string, timeout time.Duration) error {
	c, err := dialer("tcp", src, timeout).Dial("tcp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	fmt.Fprintf(c, "GET / HTTP/1.0\r\nHost: %s\r\n\r\n", addr)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", addr, resp.Status)
	}
	_, err = io.Copy(os.Stdout, resp.Body)
	return err
}

func addrs() error {
	ifs, err := net.Interfaces()
	if err != nil {
		return err
	}
	for _, i := range ifs {
		as, err := i.Addrs()
		if err != nil {
			return err
		}
		for _, a := range as {
			fmt.Println(i.Name, i.HardwareAddr.String(), a.String())
		}
	}
	return nil
}
