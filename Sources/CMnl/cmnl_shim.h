#ifndef CMNL_SHIM_H
#define CMNL_SHIM_H

// Swift imports functions and simple #define constants, but not function-like macros. Everything
// libmnl and the kernel headers express as a macro that NBSNetlink needs gets one prefixed
// `static inline` function here, so the Swift side never re-derives alignment arithmetic itself.

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/socket.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <net/if.h>
#include <libmnl/libmnl.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/if_link.h>
#include <linux/if_addr.h>

// MARK: - nlmsghdr (NLMSG_* macros)

static inline uint32_t cmnl_nlmsg_align(uint32_t len) { return NLMSG_ALIGN(len); }
static inline uint32_t cmnl_nlmsg_hdrlen(void) { return NLMSG_HDRLEN; }
static inline uint32_t cmnl_nlmsg_length(uint32_t payload) { return NLMSG_LENGTH(payload); }
static inline uint32_t cmnl_nlmsg_space(uint32_t payload) { return NLMSG_SPACE(payload); }
static inline void *cmnl_nlmsg_data(const struct nlmsghdr *nlh) { return NLMSG_DATA(nlh); }

// MNL_ALIGN and MNL_NLMSG_HDRLEN are macros too.
static inline uint32_t cmnl_align(uint32_t len) { return MNL_ALIGN(len); }
static inline size_t cmnl_mnl_nlmsg_hdrlen(void) { return MNL_NLMSG_HDRLEN; }
static inline size_t cmnl_mnl_attr_hdrlen(void) { return MNL_ATTR_HDRLEN; }

// mnl_nlmsg_ok() compares `(int)nlh->nlmsg_len <= len`: an nlmsg_len of 2^31 or more turns
// negative, passes, and mnl_nlmsg_next() then jumps gigabytes past the buffer (found by the fuzz
// test). Compare unsigned as well.
static inline bool cmnl_nlmsg_ok(const struct nlmsghdr *nlh, int len) {
    return len >= (int)sizeof(struct nlmsghdr) && nlh->nlmsg_len <= (uint32_t)len && mnl_nlmsg_ok(nlh, len);
}

// MARK: - Attribute iteration (the mnl_attr_for_each macro, split into its three clauses)
//
// for (attr = cmnl_attr_first(nlh, off); cmnl_attr_ok(nlh, attr); attr = cmnl_attr_next(attr))
//
// mnl_attr_ok() refuses an attribute whose header or nla_len runs past the message tail, so a
// corrupted length ends the walk instead of reading out of bounds.

static inline const struct nlattr *cmnl_attr_first(const struct nlmsghdr *nlh, size_t offset) {
    return (const struct nlattr *)mnl_nlmsg_get_payload_offset(nlh, offset);
}

static inline long cmnl_attr_remaining(const struct nlmsghdr *nlh, const struct nlattr *attr) {
    return (long)((const char *)mnl_nlmsg_get_payload_tail(nlh) - (const char *)attr);
}

static inline bool cmnl_attr_ok(const struct nlmsghdr *nlh, const struct nlattr *attr) {
    long remaining = cmnl_attr_remaining(nlh, attr);
    if (remaining < (long)sizeof(struct nlattr)) return false;
    return mnl_attr_ok(attr, (int)remaining);
}

static inline const struct nlattr *cmnl_attr_next(const struct nlattr *attr) {
    return (const struct nlattr *)mnl_attr_next(attr);
}

// MARK: - rtnetlink payload macros (IFA_RTA, IFLA_RTA, IFA_PAYLOAD, IFLA_PAYLOAD, RTA_*)
//
// Kept for parity with code written against the kernel macros; the parser itself walks attributes
// with libmnl above because its bounds checks are the ones we test.

static inline struct rtattr *cmnl_ifa_rta(struct ifaddrmsg *ifa) { return IFA_RTA(ifa); }
static inline uint32_t cmnl_ifa_payload(const struct nlmsghdr *nlh) { return IFA_PAYLOAD(nlh); }
static inline struct rtattr *cmnl_ifla_rta(struct ifinfomsg *ifi) { return IFLA_RTA(ifi); }
static inline uint32_t cmnl_ifla_payload(const struct nlmsghdr *nlh) { return IFLA_PAYLOAD(nlh); }
static inline bool cmnl_rta_ok(const struct rtattr *rta, int len) { return RTA_OK(rta, len); }
static inline struct rtattr *cmnl_rta_next(struct rtattr *rta, int *len) { return RTA_NEXT(rta, *len); }
static inline void *cmnl_rta_data(struct rtattr *rta) { return RTA_DATA(rta); }
static inline uint32_t cmnl_rta_payload(const struct rtattr *rta) { return RTA_PAYLOAD(rta); }

// MARK: - Constants that are enum members or macros Swift imports with awkward types

static inline uint32_t cmnl_rtmgrp_link(void) { return RTMGRP_LINK; }
static inline uint32_t cmnl_rtmgrp_ipv4_ifaddr(void) { return RTMGRP_IPV4_IFADDR; }
static inline uint32_t cmnl_rtmgrp_ipv6_ifaddr(void) { return RTMGRP_IPV6_IFADDR; }
static inline pid_t cmnl_socket_autopid(void) { return MNL_SOCKET_AUTOPID; }

// Names the calling thread (shows in top -H, gdb). prctl is variadic, which Swift cannot call, and
// pthread_setname_np needs _GNU_SOURCE.
static inline int cmnl_set_thread_name(const char *name) { return prctl(PR_SET_NAME, name, 0, 0, 0); }

// IF_OPER_* live in <linux/if.h>, which cannot be included next to glibc's <net/if.h> (both define
// struct ifreq). The values are fixed by RFC 2863 and the kernel ABI.
#define CMNL_IF_OPER_UNKNOWN 0
#define CMNL_IF_OPER_NOTPRESENT 1
#define CMNL_IF_OPER_DOWN 2
#define CMNL_IF_OPER_LOWERLAYERDOWN 3
#define CMNL_IF_OPER_TESTING 4
#define CMNL_IF_OPER_DORMANT 5
#define CMNL_IF_OPER_UP 6

#endif
