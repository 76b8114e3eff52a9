/* The latency floor of a tunnel that sleeps between datagrams (docs/bench.md, "The latency floor").
 *
 *     relayfloor LISTEN_ADDR LISTEN_PORT TO_ADDR TO_PORT
 *
 * A UDP relay that does nothing but relay: a datagram on the listening socket goes on to TO through
 * a second socket, and a datagram back on that socket goes to whoever sent last to the listening
 * one.  One wake-up (epoll_wait), one read and one send per datagram, no batching, no work.  The
 * benchmark runs one in each namespace, as rsockd's client and server run, and pings through both:
 * what it adds to plain UDP's round trip is what four sleeping passes cost on the machine, before
 * any tunnel does anything.  It prints "ready" once both sockets are set up; SIGTERM ends it.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>

static int address(const char *host, const char *port, struct sockaddr_in *out)
{
    memset(out, 0, sizeof *out);
    out->sin_family = AF_INET;
    out->sin_port = htons((unsigned short)atoi(port));
    return inet_pton(AF_INET, host, &out->sin_addr) == 1 ? 0 : -1;
}

int main(int argc, char **argv)
{
    struct sockaddr_in listen_at, to, peer;
    if (argc != 5 || address(argv[1], argv[2], &listen_at) || address(argv[3], argv[4], &to)) {
        fprintf(stderr, "usage: relayfloor LISTEN_ADDR LISTEN_PORT TO_ADDR TO_PORT (IPv4)\n");
        return 2;
    }
    int in = socket(AF_INET, SOCK_DGRAM, 0), out = socket(AF_INET, SOCK_DGRAM, 0), ep = epoll_create1(0);
    if (in < 0 || out < 0 || ep < 0 || bind(in, (struct sockaddr *)&listen_at, sizeof listen_at) ||
        connect(out, (struct sockaddr *)&to, sizeof to)) {
        perror("relayfloor");
        return 1;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = in};
    epoll_ctl(ep, EPOLL_CTL_ADD, in, &ev);
    ev.data.fd = out;
    epoll_ctl(ep, EPOLL_CTL_ADD, out, &ev);
    socklen_t peer_len = 0;
    static char buf[65536];
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        struct epoll_event ready[2];
        int n = epoll_wait(ep, ready, 2, -1);
        if (n < 0 && errno != EINTR) {
            perror("relayfloor: epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            if (ready[i].data.fd == in) {
                socklen_t len = sizeof peer;
                ssize_t k = recvfrom(in, buf, sizeof buf, MSG_DONTWAIT, (struct sockaddr *)&peer, &len);
                if (k >= 0) {
                    peer_len = len;
                    send(out, buf, (size_t)k, 0);
                }
            } else {
                ssize_t k = recv(out, buf, sizeof buf, MSG_DONTWAIT);
                if (k >= 0 && peer_len)
                    sendto(in, buf, (size_t)k, 0, (struct sockaddr *)&peer, peer_len);
            }
        }
    }
}
